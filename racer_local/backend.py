"""llama.cpp through llama-cpp-python's low-level ctypes API: the only module that touches ctypes.

It loads a model, tokenizes, decodes batches of (token, position, sequence ids) with logits
returned as a numpy view (or, with set_top_k, only each row's best k, taken where the model
runs), and edits the KV cache by sequence id. Sequence 0 always holds the
committed text; draft trees borrow ids 1..n_seq_max-1 for the duration of one verification
(see tree.py for the encoding). It knows nothing about drafting or sampling.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as ll
import numpy as np

from racer_local import defaults
from racer_local import output_layer as native_output
from racer_local.errors import ContextFullError, DecodeError, ModelError
from racer_local.gguf import check_gguf
from racer_local.topk import TopK

_init_lock = threading.Lock()
_initialized = False


@ll.llama_log_callback
def _log_to_nowhere(level, text, user_data):  # noqa: ARG001
    """llama.cpp logs every load to stderr; silence it unless RACER_LOCAL_VERBOSE is set."""


def init_llama() -> None:
    global _initialized
    with _init_lock:
        if _initialized:
            return
        # The callback object lives at module level: llama.cpp keeps its pointer forever.
        if not os.environ.get("RACER_LOCAL_VERBOSE"):
            ll.llama_log_set(_log_to_nowhere, ctypes.c_void_p())
        ll.llama_backend_init()
        _initialized = True


def default_threads() -> int:
    """Physical-ish core count: llama.cpp gets slower, not faster, with hyperthreads."""
    n = os.cpu_count() or 1
    return max(1, n // 2) if n > 4 else n


class Backend:
    """One loaded model with one context. Not thread-safe: the Engine serialises access."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = defaults.N_CTX,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_seq_max: int = 64,
        n_batch: int = 512,
        rpc: str | Sequence[str] = (),
        output_layer: str = defaults.OUTPUT_LAYER,
    ) -> None:
        """`rpc`: HOST:PORT of llama.cpp RPC workers that take every layer but the output (rpc.py).
        `output_layer`: who computes the logits of a batch of 2 or more rows, "native" (racer-local's
        own, output_layer.py: an error where it cannot serve), "llama.cpp", or "auto" (native
        where it can serve; use_native_output() may still turn it off)."""
        if n_ctx < 16:
            raise ValueError(f"n_ctx must be at least 16, got {n_ctx}")
        if not 2 <= n_seq_max <= 256:
            raise ValueError(f"n_seq_max must be in 2..256 (llama.cpp's cap), got {n_seq_max}")
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"threads must be at least 1, got {n_threads}")
        if rpc and n_gpu_layers:
            raise ValueError("with RPC workers the layers go to them: leave n_gpu_layers at 0")
        if output_layer not in native_output.WHERE:
            raise ValueError(f"output_layer must be one of {', '.join(native_output.WHERE)}, "
                             f"got {output_layer!r}")
        self.model_path = Path(model_path)
        header = check_gguf(self.model_path)
        init_llama()
        self.n_threads = n_threads or default_threads()
        self.n_seq_max = n_seq_max
        self._model = self._ctx = self._batch = None
        self._chains: list = []  # the top-k sampler chains attached, one per sequence id

        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.load_mode = ll.LLAMA_LOAD_MODE_MMAP
        self.rpc: tuple[str, ...] = ()
        if rpc:
            from racer_local import rpc as rpc_

            self.rpc = tuple(rpc_.parse_endpoints(rpc))
            self._placement = rpc_.place_on_workers(mparams, self.rpc)  # arrays mparams points into
            n_gpu_layers = mparams.n_gpu_layers
        self._model = ll.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise ModelError(
                f"llama.cpp could not load {self.model_path}: the file is corrupt, incomplete or "
                "of an unsupported architecture (set RACER_LOCAL_VERBOSE=1 to see llama.cpp's log)"
            )
        self.n_gpu_layers = n_gpu_layers
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self._hook = self._head = self._native = None  # racer-local's output layer (output_layer.py)
        on_cpu = n_gpu_layers == 0 and not self.rpc
        self.output_layer_why = ("llama.cpp's was asked for" if output_layer == "llama.cpp"
                                 else native_output.unavailable(header, self.n_vocab, on_cpu=on_cpu))
        if output_layer == "native" and self.output_layer_why:
            self.close()
            raise ModelError(f"racer-local's output layer cannot serve {self.model_path.name}: "
                             f"{self.output_layer_why}; use llama.cpp's (--output-layer llama.cpp)")
        if self.output_layer_why is None:  # _hook: as long as the context, whose callback points into it
            self._hook = self._head = native_output.load(self.model_path, header, max_rows=n_seq_max)

        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.kv_unified = True  # tree attention: every path id sees the shared prefix cells
        # With top-k on the backend a tree's rows all fall in a few sequences (a chain's in one),
        # and llama.cpp's default lets a sampled sequence have one output per batch.
        cparams.n_outputs_max_per_seq = n_batch
        cparams.no_perf = True
        if self._head is not None:  # it watches every decode, and stops the armed ones at the norm
            cparams.cb_eval = ll.ggml_backend_sched_eval_callback(self._head.callback)
            cparams.cb_eval_user_data = self._head.user_data
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.n_ctx = ll.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(n_batch, 0, n_seq_max)
        self._token = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
        self._n_seq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))
        self._want = np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))
        self._seq = [
            np.ctypeslib.as_array(self._batch.seq_id[i], shape=(n_seq_max,)) for i in range(n_batch)
        ]
        self._pieces: dict[int, bytes] = {}
        self.top_k = 0  # 0: decode returns full logits rows; else TopK rows of this many
        # > 0: the batches racer-local's output layer computes come back as each row's best this
        # many (TopK), kept as its kernel goes: no row of n_vocab logits is written or read again.
        # Greedy verification and the copy-logit table need no more; sampling needs full rows.
        self.native_top_k = 0
        self.call_s = self.read_s = 0.0  # the last decode's forward pass and its rows' read
        if self._head is not None:
            self._check_native_output(strict=output_layer == "native")

    # ----- racer-local's output layer ---------------------------------------------------------

    @property
    def output_layer(self) -> str:
        """Who computes the logits of a batch of MIN_ROWS or more rows now."""
        return "native" if self._native is not None else "llama.cpp"

    @property
    def native_output_loaded(self) -> bool:
        """racer-local's output layer serves this model here (whether or not it is in use)."""
        return self._head is not None

    def use_native_output(self, on: bool) -> None:
        """Switch multi-row batches between racer-local's output layer (where it loaded) and
        llama.cpp's; the cost curves of the two are measured apart."""
        if on and self._head is None:
            raise ModelError(f"racer-local's output layer cannot serve this model: {self.output_layer_why}")
        if on and self._native is None:
            self._native = np.empty((self.n_seq_max, self.n_vocab), dtype=np.float32)  # its rows
        elif not on:
            self._native = None

    def _check_native_output(self, *, strict: bool) -> None:
        """Compare a probe batch's logits both ways before trusting racer-local's layer: a graph
        that does more after the final norm than the output matrix would show here."""
        seq, n = self.n_seq_max - 1, native_output.PROBE_ROWS
        tokens = [(self.bos + 97 * i) % self.n_vocab for i in range(n)]
        rows = []
        try:
            for on in (False, True):
                self.use_native_output(on)
                rows.append(self.decode(tokens, range(n), [(seq,)] * n).copy())
                self.seq_rm(seq)
        except DecodeError as e:  # it captured no final norm: a graph that names it otherwise
            self.seq_rm(seq)
            self.output_layer_why = str(e)
        else:
            if not native_output.agrees(rows[1], rows[0]):
                self.output_layer_why = "its logits differ from llama.cpp's on a probe"
        if self.output_layer_why:
            self.use_native_output(False)
            self._head = None  # (the callback keeps its state alive in self._hook)
            if strict:
                self.close()
                raise ModelError(f"racer-local's output layer cannot serve {self.model_path.name}: "
                                 f"{self.output_layer_why}; use llama.cpp's (--output-layer llama.cpp)")

    # ----- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the batch, context and model now rather than whenever the GC runs."""
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        self._hook = self._head = self._native = None  # after the context whose callback used it
        self._free_chains()  # after the context that used them
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the ctypes module may be gone already
            pass

    # ----- metadata and text ----------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def chat_template(self) -> str | None:
        raw = ll.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def apply_chat_template(self, messages: Sequence[tuple[str, str]], template: str) -> str | None:
        """(role, content) pairs as prompt text in llama.cpp's built-in chat format detected from
        `template` (a Jinja template or a name such as "chatml"), the assistant's turn opened.
        None if llama.cpp does not recognise the template."""
        encoded = [(role.encode(), content.encode()) for role, content in messages]
        chat = (ll.llama_chat_message * len(encoded))(*(ll.llama_chat_message(r, c) for r, c in encoded))
        size = 2 * sum(len(r) + len(c) for r, c in encoded) + 1024
        while True:
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_chat_apply_template(template.encode(), chat, len(encoded), True, buf, size)
            if n < 0:
                return None
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n  # the buffer was too small: n is the length needed

    @property
    def bos(self) -> int:
        return ll.llama_vocab_bos(self._vocab)

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self._vocab, int(token)))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: n is minus the size needed
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The raw bytes of one token; may be part of a UTF-8 character (see text.Detokenizer)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    # ----- decoding -------------------------------------------------------------------------

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seq_ids: Sequence[Sequence[int]] | None = None,
        *,
        n_logits: int | None = None,
    ) -> np.ndarray:
        """Decode one batch; return the logits of its last `n_logits` tokens (default all).

        The result is a float32 view of llama.cpp's own buffer (or of racer-local's output
        layer's), shape (n_logits, n_vocab), valid until the next decode: copy what must outlive
        it (with set_top_k, or native_top_k where racer-local's layer ran: a TopK of its own).
        seq_ids default to sequence 0.
        """
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a batch holds 1..{self.n_batch} tokens, got {n}")
        n_logits = n if n_logits is None else n_logits
        self._token[:n] = tokens
        self._pos[:n] = positions
        self._want[:n] = 0
        self._want[n - n_logits : n] = 1
        if seq_ids is None:
            self._n_seq[:n] = 1
            for i in range(n):
                self._seq[i][0] = 0
        else:
            for i, ids in enumerate(seq_ids):
                self._n_seq[i] = len(ids)
                self._seq[i][: len(ids)] = ids
        self._batch.n_tokens = n
        native = (self._native is not None and not self.top_k
                  and native_output.MIN_ROWS <= n_logits <= len(self._native))
        t0 = time.perf_counter()
        if native:  # its logits are part of the forward pass: nothing left to read
            rows = self._decode_native(n_logits)
            t1 = time.perf_counter()
        else:
            rc = ll.llama_decode(self._ctx, self._batch)
            t1 = time.perf_counter()
            if rc != 0:
                self._raise_decode_error(rc, n)
            if n_logits == 0:
                rows = self._no_rows()
            elif self.top_k:
                rows = self._read_top_k(n - n_logits, n)
            else:
                rows = np.ctypeslib.as_array(ll.llama_get_logits(self._ctx), shape=(n_logits, self.n_vocab))
        self.call_s, self.read_s = t1 - t0, time.perf_counter() - t1
        return rows

    def _decode_native(self, n_logits: int) -> np.ndarray | TopK:
        """llama.cpp's graph up to the final norm, then racer-local's output layer."""
        self._head.arm(True)
        try:
            rc = ll.llama_decode(self._ctx, self._batch)
        finally:
            self._head.arm(False)
        if rc != 0:
            self._raise_decode_error(rc, self._batch.n_tokens)
        if self._head.captured != n_logits:
            raise DecodeError(f"racer-local's output layer captured {self._head.captured} hidden states, "
                              f"not {n_logits}; run with --output-layer llama.cpp")
        if self.native_top_k:
            k = self.native_top_k
            ids, logits = np.empty((n_logits, k), dtype=np.int32), np.empty((n_logits, k), dtype=np.float32)
            try:
                self._head.top_k(k, ids, logits, self.n_threads)
            except ValueError as e:  # NaN logits: the model or its weights are broken
                raise DecodeError(f"racer-local's output layer: {e}; "
                                  "run with --output-layer llama.cpp") from e
            return TopK(ids, logits)
        self._head.logits(self._native, self.n_threads)
        return self._native[:n_logits]

    def set_top_k(self, k: int) -> None:
        """From the next decode on, return each row's best k tokens (TopK), taken inside the
        compute graph, instead of full rows; 0 returns to full rows.

        Every sequence id gets its own top-k sampler chain, since llama.cpp picks a row's chain
        by its token's first id and a chain serves one id. Switching costs a graph reservation
        at the next decode, so keep one mode while it serves.
        """
        if k == self.top_k:
            return
        if not 0 <= k <= self.n_vocab:
            raise ValueError(f"top_k must be in 0..{self.n_vocab}, got {k}")
        self._detach_chains()
        for seq in range(self.n_seq_max if k else 0):
            chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
            # Twice: alone, top-k hands back its own output as the candidates, a tensor the graph
            # allocator frees once the logits are gathered from it, so another row's ops could
            # overwrite it before the copy out (seen here: 1 row in 5,000 with another row's ids
            # and its own logits). The second pass over k values makes the ids a fresh tensor.
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(k))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(k))
            self._chains.append(chain)
            if not ll.llama_set_sampler(self._ctx, seq, chain):
                self._detach_chains()
                raise ModelError("llama.cpp cannot take top-k on this model's backend; use full rows")
        self.top_k = k

    def _detach_chains(self) -> None:
        """Back to full rows: chain i was attached to sequence i."""
        for seq in range(len(self._chains)):
            ll.llama_set_sampler(self._ctx, seq, None)
        self._free_chains()
        self.top_k = 0

    def _free_chains(self) -> None:
        for chain in self._chains:  # the context only borrowed them
            ll.llama_sampler_free(chain)
        self._chains = []

    def _read_top_k(self, first: int, end: int) -> TopK:
        k = self.top_k
        ids = np.empty((end - first, k), dtype=np.int32)
        logits = np.empty((end - first, k), dtype=np.float32)
        for row, i in enumerate(range(first, end)):
            got = ll.llama_get_sampled_candidates_count_ith(self._ctx, i)
            if got != k:
                raise DecodeError(f"llama.cpp returned {got} top-k candidates for batch row {i}, not {k}")
            ctypes.memmove(ids[row].ctypes.data, ll.llama_get_sampled_candidates_ith(self._ctx, i), 4 * k)
            ctypes.memmove(logits[row].ctypes.data, ll.llama_get_sampled_logits_ith(self._ctx, i), 4 * k)
        return TopK.sorted(ids, logits)

    def _raise_decode_error(self, rc: int, n: int) -> None:
        if rc == 1:
            raise ContextFullError(
                f"no room in the KV cache for {n} more tokens (context is {self.n_ctx} tokens)"
            )
        raise DecodeError(f"llama_decode failed with code {rc}")

    def prefill(
        self,
        tokens: Sequence[int],
        start: int,
        *,
        n_logits: int = 1,
        interrupt: threading.Event | None = None,
    ) -> np.ndarray:
        """Decode a long run into sequence 0 in n_batch chunks; return its last n_logits rows.

        `interrupt` is checked between chunks (no abort callback: a Python callback inside
        every llama_decode would cost more than it saves); on interrupt the caller rolls back.
        """
        if start + len(tokens) > self.n_ctx:
            raise ContextFullError(
                f"the prompt needs {start + len(tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten the prompt or raise n_ctx"
            )
        n_logits = min(n_logits, len(tokens))
        parts = []
        # Full rows or set_top_k's, one kind whichever chunks the rows fall in: native_top_k is
        # off here (a prompt's few rows cost little either way).
        kept, self.native_top_k = self.native_top_k, 0
        try:
            for lo in range(0, len(tokens), self.n_batch):
                if interrupt is not None and interrupt.is_set():
                    raise DecodeError("generation was cancelled", cancelled=True)
                chunk = tokens[lo : lo + self.n_batch]
                tail = max(0, n_logits - (len(tokens) - lo - len(chunk)))  # rows due in this chunk
                positions = range(start + lo, start + lo + len(chunk))
                out = self.decode(chunk, positions, n_logits=min(tail, len(chunk)))
                if len(out):
                    parts.append(out.copy())  # a full row is a view of llama.cpp's buffer
        finally:
            self.native_top_k = kept
        if not parts:
            return self._no_rows()
        rows = TopK.concat(parts) if self.top_k else np.concatenate(parts)
        return rows[-n_logits:]

    def _no_rows(self):
        if self.top_k:
            return TopK(np.empty((0, self.top_k), np.int32), np.empty((0, self.top_k), np.float32))
        return np.empty((0, self.n_vocab), dtype=np.float32)

    # ----- KV cache -------------------------------------------------------------------------

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        ll.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        if not ll.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise DecodeError(f"llama.cpp refused to remove positions {p0}..{p1} of sequence {seq}")

    def pos_max(self, seq: int = 0) -> int:
        """Largest position held by a sequence, -1 when it holds none."""
        return ll.llama_memory_seq_pos_max(self._mem, seq)

    def clear(self) -> None:
        ll.llama_memory_clear(self._mem, True)
