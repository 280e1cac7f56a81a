"""llama.cpp's llama-server as the bench's peer: started, driven and always stopped.

Fake servers (small Python scripts standing in for the binary) check the failure paths on any
machine: a server that exits while starting, one that dies in the middle of a request, one
that hangs on SIGTERM. The real binary, where it is built (`./install.sh --llama-server` or
the first bench), is driven on the embedded model: its greedy output is the model's, its
figures are the server's timings under racer's names, and no process outlives close().
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time

import pytest

from racer_local import bench, bench_methods, llama_server_build
from racer_local.llama_server import LlamaServer, PeerError

# ----- method names and the report's comparison --------------------------------------------


def test_method_names():
    for name in ("llama.cpp", "llama.cpp-ngram-mod", "llama.cpp-ngram-simple", "llama.cpp-ngram-map-k",
                 "llama.cpp-ngram-cache", "racer", "pld", "llama-cpp-python-pld"):
        assert bench_methods.known_method(name), name
    for name in ("llama.cpp-ngram", "llama.cpp-eagle", "llama.cpp-", "racer2"):
        assert not bench_methods.known_method(name), name
    assert [bench_methods.is_peer(x) for x in ("pld", "llama.cpp#2", "llama.cpp-ngram-mod", "racer",
                                               "racer-retrieval", "ar")] == [1, 1, 1, 0, 0, 0]


def _summary(**speedups):
    """A summary with one category "c" whose speedups equal the overall ones."""
    return {label: {"overall": {"speedup": s, "prompts": 1}, "categories": {"c": {"speedup": s}}}
            for label, s in speedups.items()}


def test_racer_is_compared_with_the_best_peer_per_category():
    summary = _summary(ar=1.0, racer=1.8, pld=1.2, **{"llama.cpp-ngram-mod": 1.5, "racer-retrieval": 1.9})
    summary["pld"]["categories"]["c"]["speedup"] = 2.0  # pld wins this category
    versus = bench.versus_peers(summary)
    assert versus["overall"] == {"best_peer": "llama.cpp-ngram-mod", "peer_speedup": 1.5,
                                 "racer_speedup": 1.8, "ratio": pytest.approx(1.2)}
    assert versus["c"]["best_peer"] == "pld" and versus["c"]["ratio"] == pytest.approx(0.9)
    assert bench.versus_peers(_summary(ar=1.0, racer=1.1)) == {}  # no peer in the run
    assert bench.same_engine(_summary(ar=1.0, **{"llama.cpp": 0.98})) == 0.98
    assert bench.same_engine(summary) is None


# ----- fake servers: the failure paths -----------------------------------------------------


def _fake(tmp_path, body: str):
    """An executable standing in for llama-server: parses --port, then runs `body`."""
    path = tmp_path / "fake-llama-server"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
        import http.server, json, os, signal, sys, time
        port = int(sys.argv[sys.argv.index("--port") + 1])
        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
            def do_POST(self):
                print("request received, dying", flush=True)
                os._exit(3)
        """) + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_a_server_that_exits_while_starting_says_why(tmp_path, model_path):
    binary = _fake(tmp_path, 'print("error: unknown argument --frobnicate", flush=True)\nsys.exit(1)\n')
    with pytest.raises(PeerError, match="exited with code 1 while starting.*unknown argument"):
        LlamaServer(binary, model_path, n_ctx=256, threads=1)


def test_a_server_that_dies_mid_request_is_an_error_and_is_gone(tmp_path, model_path):
    binary = _fake(tmp_path, 'http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()\n')
    with LlamaServer(binary, model_path, n_ctx=256, threads=1) as server:
        with pytest.raises(PeerError, match="died during a request.*exit code 3.*dying"):
            server.complete([1, 2, 3], n_predict=4)
        assert server.proc.poll() == 3


def test_a_server_that_ignores_sigterm_is_killed(tmp_path, model_path):
    binary = _fake(tmp_path, 'signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
                             'http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()\n')
    server = LlamaServer(binary, model_path, n_ctx=256, threads=1)
    server.close()
    assert server.proc.returncode == -9
    server.close()  # twice is fine


def test_a_bench_peer_that_cannot_start_is_reported_not_dropped(tmp_path, engine):
    binary = _fake(tmp_path, "sys.exit(2)\n")
    runner = bench_methods.make_method(engine, "llama.cpp-ngram-mod", {}, binary)
    with pytest.raises(RuntimeError, match="could not start: PeerError: llama-server exited with code 2"):
        runner.generate([1, 2], 4, {})


def test_a_given_binary_must_exist(tmp_path, monkeypatch):
    monkeypatch.delenv(llama_server_build.ENV_BINARY, raising=False)
    with pytest.raises(llama_server_build.PeerBuildError, match="not an executable file"):
        llama_server_build.find(tmp_path / "missing")
    monkeypatch.setenv(llama_server_build.ENV_BINARY, str(tmp_path / "missing"))
    with pytest.raises(llama_server_build.PeerBuildError, match="RACER_LOCAL_LLAMA_SERVER"):
        llama_server_build.find()


# ----- the real binary --------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary():
    path = llama_server_build.find()
    if path is None:
        where = llama_server_build.current_build().binary
        pytest.skip(f"llama-server is not built for this binding (no {where}); "
                    "`./install.sh --llama-server` builds it")
    return path


def test_real_server_greedy_output_is_the_models(binary, engine):
    """Same prompt tokens, same greedy tokens as racer-local's `ar` (or a near-tie flip), and the
    server's timings under racer's names."""
    prompt = engine.tokenize("The capital of France is Paris. The capital of Italy is")
    engine.reset()
    ours = engine.generate(prompt, max_tokens=24, method="ar")
    engine.reset()
    for spec in (None, "ngram-mod"):
        peer = bench_methods.LlamaCppServer(engine, spec, binary)
        try:
            turn = peer.generate(prompt, 24, {"temperature": 0.0})
            if sys.platform.startswith("linux"):  # the bench's quiet-machine check counts it
                assert bench_methods.peer_cpu_seconds([peer]) > 0
        finally:
            peer.close()
        assert peer.server.proc.poll() is not None  # stopped
        s = turn.stats
        assert s.prompt_tokens == len(prompt) and s.generated_tokens == len(turn.tokens) == 24
        assert s.prefill_s > 0 and s.decode_s > 0 and s.steps == 24 - s.accepted
        assert turn.finish_reason == "length" and turn.text == engine.backend.detokenize(turn.tokens)
        n = next((i for i, (a, b) in enumerate(zip(turn.tokens, ours.tokens)) if a != b), None)
        assert n is None or n > 8, (spec, turn.tokens, ours.tokens)


def test_a_peer_that_forgets_starts_a_fresh_server_and_keeps_its_cpu_count(binary, engine):
    peer, prompt = bench_methods.LlamaCppServer(engine, "ngram-mod", binary), engine.tokenize("Once upon a")
    try:
        peer.generate(prompt, 8, {"temperature": 0.0})
        first, used = peer.server.proc, peer.cpu_seconds()
        peer.forget()
        assert first.poll() is not None and peer.server.proc.poll() is None
        assert peer.cpu_seconds() >= used
        assert peer.generate(prompt, 8, {"temperature": 0.0}).stats.generated_tokens == 8
    finally:
        peer.close()


def test_real_server_killed_mid_generation(binary, engine):
    peer = bench_methods.LlamaCppServer(engine, None, binary)
    try:
        killer = threading.Timer(0.3, peer.server.proc.kill)
        killer.start()
        with pytest.raises(PeerError, match="died during a request"):
            peer.generate(engine.tokenize("Once upon a time"), 100000, {"temperature": 0.0})
    finally:
        peer.close()
    assert peer.server.proc.poll() is not None


def _servers_running(binary) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/exe") == str(binary):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_bench_with_peers_leaves_no_server_behind(binary, tmp_path, model_path):
    from click.testing import CliRunner

    from racer_local.cli import main

    before = set(_servers_running(binary))
    out = tmp_path / "b"
    args = ["bench", "--suite", "mgsm-zh", "--limit", "1", "--max-tokens", "16", "--threads", "1",
            "--n-ctx", "512", "-m", str(model_path), "--out", str(out), "--methods",
            "ar,llama.cpp,llama.cpp-ngram-mod,llama.cpp-ngram-simple", "--llama-server", str(binary),
            "--repeats", "2"]  # the second round on fresh servers
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    deadline = time.monotonic() + 5
    while set(_servers_running(binary)) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(_servers_running(binary)) - before
    import json

    data = json.loads((out / "results.json").read_text())
    for label in ("llama.cpp", "llama.cpp-ngram-mod", "llama.cpp-ngram-simple"):
        m = data["summary"][label]["overall"]
        assert m["failed"] == 0 and m["generated_tokens"] > 0 and m["tokens_per_s"] > 0, label
    assert data["environment"]["llama_server"] == str(binary)
    assert isinstance(data["environment"]["native_index"], bool)
    assert data["same_engine"] == data["summary"]["llama.cpp"]["overall"]["speedup"]
    assert "racer / best peer" not in (out / "report.md").read_text()  # no racer in this run
