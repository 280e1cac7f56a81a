"""Layers over llama.cpp's RPC backend: workers are probed before llama.cpp sees them (a clear
error, never an abort), and two loopback `rpc-worker`s give a local run's greedy output."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time

import llama_cpp
import pytest
from click.testing import CliRunner

from racer_local import rpc
from racer_local.cli import main
from racer_local.errors import RpcError
from racer_local.link import relay
from racer_local.llama_server import free_port

needs_rpc = pytest.mark.skipif(not llama_cpp.llama_supports_rpc(),
                               reason="llama.cpp was built without RPC (./install.sh adds -DGGML_RPC=ON)")


def test_endpoints_are_checked():
    assert rpc.parse_endpoints("127.0.0.1:50052, example.org:7") == ["127.0.0.1:50052", "example.org:7"]
    assert rpc.parse_endpoints(["h:1"]) == ["h:1"]
    for bad in ("127.0.0.1", "h:port", ":50052", "h:0", "h:70000", "", "h:1,h:1"):
        with pytest.raises(ValueError):
            rpc.parse_endpoints(bad)


def fake_worker(answer) -> str:
    """A one-connection TCP server that reads a HELLO and answers with `answer(sock)`."""
    server = socket.create_server(("127.0.0.1", 0))

    def run():
        conn, _ = server.accept()
        with conn:
            conn.recv(1 + 8 + rpc._CAPS)
            answer(conn)
        server.close()

    threading.Thread(target=run, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


def hello(major: int, minor: int):
    return lambda conn: conn.sendall(struct.pack("<Q", 28) + bytes([major, minor, 0, 0]) + bytes(24))


def test_an_unreachable_worker_is_named():
    port = free_port()  # nothing listens there
    with pytest.raises(RpcError, match=f"cannot reach RPC worker 127.0.0.1:{port}.*rpc-worker"):
        rpc.probe(f"127.0.0.1:{port}")


def test_another_protocol_version_is_refused():
    with pytest.raises(RpcError, match="speaks protocol 6.1.0.*same racer-local"):
        rpc.probe(fake_worker(hello(6, 1)))
    newer = fake_worker(hello(rpc.PROTOCOL[0], rpc.PROTOCOL[1] + 1))
    with pytest.raises(RpcError, match="speaks protocol"):
        rpc.probe(newer)


def test_a_worker_that_hangs_up_or_stays_silent_is_named():
    with pytest.raises(RpcError, match="closed the connection"):
        rpc.probe(fake_worker(lambda conn: None))
    with pytest.raises(RpcError, match="did not answer within"):
        rpc.probe(fake_worker(lambda conn: time.sleep(2)), timeout=0.3)


def test_a_worker_without_devices_is_refused():
    def no_devices(conn):
        hello(*rpc.PROTOCOL[:2])(conn)
        conn.recv(9)
        conn.sendall(struct.pack("<QI", 4, 0))

    with pytest.raises(RpcError, match="offers no devices"):
        rpc.probe(fake_worker(no_devices))


@needs_rpc
def test_the_cli_reports_an_unreachable_worker_in_one_line(model_path):
    port = free_port()
    result = CliRunner().invoke(main, ["generate", "Hi", "-m", str(model_path), "-n", "2",
                                       "--rpc", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach RPC worker 127.0.0.1:{port}" in lines[0]


def test_the_link_delays_each_direction():
    """The relay the RPC measurement uses: bytes pass unchanged, a round trip pays 2 x latency."""
    echo = socket.create_server(("127.0.0.1", 0))

    def serve_echo():
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    threading.Thread(target=serve_echo, daemon=True).start()
    port, ready = free_port(), threading.Event()
    to = ("127.0.0.1", echo.getsockname()[1])
    threading.Thread(target=relay, args=(("127.0.0.1", port), to, 0.02, 1000.0, ready), daemon=True).start()
    assert ready.wait(5)
    with socket.create_connection(("127.0.0.1", port)) as s:
        started = time.perf_counter()
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        assert time.perf_counter() - started >= 0.04


# ----- two real workers on loopback -----------------------------------------------------------


@pytest.fixture(scope="module")
def workers():
    """Two `racer-local rpc-worker`s on free loopback ports, each answering the probe."""
    procs, endpoints = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "from racer_local.cli import main; main()", "rpc-worker",
             "--port", str(port), "--threads", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        endpoints.append(f"127.0.0.1:{port}")
    try:
        for proc, endpoint in zip(procs, endpoints):
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    rpc.probe(endpoint, timeout=5)
                    break
                except RpcError:
                    assert time.monotonic() < deadline, f"worker {endpoint} never answered"
                    time.sleep(0.2)
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def first_difference(a: list[int], b: list[int]) -> int | None:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return i if i is not None or len(a) == len(b) else min(len(a), len(b))


@needs_rpc
def test_the_model_split_over_two_workers_decodes_like_a_local_run(model_path, engine, workers):
    """Same greedy text as here, up to a near-tie (the output layer's matmul runs here, the
    blocks' on the workers: other kernel choices, other last bits; see test_lossless), and
    RACER still verifies several tokens a step."""
    from racer_local.bench import NEAR_TIE, plain_margins
    from racer_local.engine import Engine

    prompt = "List the planets of the solar system in order from the sun: Mercury, Venus,"
    engine.reset()
    local = engine.generate(prompt, max_tokens=32, method="ar")
    with Engine(model_path, n_ctx=1024, threads=2, rpc=workers) as remote:
        assert remote.backend.rpc == tuple(workers)
        split = {m: remote.generate(prompt, max_tokens=32, method=m) for m in ("ar", "racer")}
    for method, run in split.items():
        i = first_difference(run.tokens, local.tokens)
        if i is not None:
            margins = plain_margins(engine, engine.tokenize(prompt), local.tokens)
            margin = margins[i] if i < len(margins) else float("inf")  # inf: it ran on past the local end
            assert margin < NEAR_TIE, f"{method} over RPC left the local text at {i}, margin {margin:.2f}"
    assert split["racer"].stats.steps < split["ar"].stats.steps  # trees verify several tokens a step

def test_bench_keeps_other_clients_off_the_workers(tmp_path):
    """A worker serves one client at a time and the engine holds it: peers that would need their
    own connection are refused up front, by name, before anything loads."""
    from racer_local import bench

    (tmp_path / "mgsm_zh.tsv").write_text("问题一\t1\n")
    with pytest.raises(ValueError, match="llama.cpp-ngram-mod cannot share the RPC workers"):
        bench.run(model=None, threads=1, n_ctx=256, n_gpu_layers=0, suite="mgsm-zh", data_dir=tmp_path,
                  methods=["ar", "llama.cpp-ngram-mod"], limit=1, max_tokens=4, sampling={},
                  out=tmp_path / "out", command="", rpc=["127.0.0.1:1"])
