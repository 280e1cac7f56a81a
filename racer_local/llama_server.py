"""llama.cpp's own `llama-server` as a peer: one process on 127.0.0.1, driven over HTTP.

A server is started with the model, context, threads, batch and GPU layers of the Engine it is
compared with, one slot, and optionally one of llama.cpp's speculative modes; it is stopped by
`close()`, on exit, and (Linux) by the kernel if this process dies first, so no server outlives
its bench. Requests send token ids, so every method sees the same prompt tokens; figures come
from the server's own `timings`.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from racer_local.errors import RacerError

START_TIMEOUT_S = 120.0  # loading a model from a cold disk
REQUEST_TIMEOUT_S = 3600.0  # one generation; a dead server is noticed at once, not after this
SPEC_TYPES = ("ngram-mod", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-cache")


class PeerError(RacerError):
    """llama-server failed to start, died, or refused a request; the message has its last log lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LlamaServer:
    def __init__(self, binary: str | Path, model: str | Path, *, n_ctx: int, threads: int,
                 n_batch: int = 512, n_gpu_layers: int = 0, spec_type: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        if spec_type is not None and spec_type not in SPEC_TYPES:
            raise ValueError(f"unknown llama.cpp speculative type {spec_type!r}; "
                             f"one of {', '.join(SPEC_TYPES)}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                "-c", str(n_ctx), "-t", str(threads), "-tb", str(threads), "-b", str(n_batch),
                "-ub", str(n_batch), "-ngl", str(n_gpu_layers), "-np", "1", "--no-webui",
                "--cache-ram", "0", *(("--spec-type", spec_type) if spec_type else ()), *extra_args]
        self.args = args
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True,  # Ctrl-C reaches us, and we stop it
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        atexit.register(self.close)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(f"llama-server exited with code {self.proc.returncode} while starting: "
                                f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.1)
        raise PeerError(f"llama-server did not become ready within {START_TIMEOUT_S:.0f} s: "
                        f"{self.log_tail()}")

    def complete(self, prompt: list[int], **fields) -> dict:
        """POST /completion with token ids; the server's JSON answer."""
        body = json.dumps({"prompt": [int(t) for t in prompt], "stream": False, **fields}).encode()
        req = urllib.request.Request(self.url + "/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise PeerError(f"llama-server answered {e.code}: {detail}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            try:  # a dropped connection is usually a dying server: give it a moment to exit
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.poll() is not None:
                raise PeerError(f"llama-server died during a request (exit code {self.proc.returncode}): "
                                f"{self.log_tail()}") from e
            raise PeerError(f"llama-server did not answer: {e}") from e

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (0 where /proc is not there, or once it exited):
        the bench's check that the machine was quiet counts the peer's work as its own."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        atexit.unregister(self.close)
        if proc is not None and proc.returncode in (0, -signal.SIGTERM):  # a clean stop: no log to keep
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
