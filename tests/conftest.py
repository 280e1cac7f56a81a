"""Shared fixtures for tests that need the real embedded model (gemma-3-270m, Q4_K_M GGUF).

Both are session-scoped: assembling/verifying the model and loading it into llama.cpp cost
seconds, so every real-model test shares one file path and one engine. Pure and fake-backend
tests must not use them.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

REAL_MODEL = {"model_path", "engine"}  # the fixtures that load the embedded model


def pytest_collection_modifyitems(items):
    """Tier the suite: a test using the real model is marked `model` (seconds to minutes each);
    `pytest -m "not model"` runs the pure and fake-backend tier (300 tests, 85 s here)."""
    for item in items:
        if REAL_MODEL & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def model_path():
    """Path of the embedded GGUF model (assembled into the cache directory on first use)."""
    from racer_local.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def engine(model_path):
    """One Engine on the embedded model, small context and 2 threads; closed at session end.

    Tests share its KV cache: call engine.reset() if a test depends on starting cold.
    """
    from racer_local.engine import Engine  # imports llama.cpp: only when a test asks for it

    with Engine(model_path, n_ctx=1024, threads=2) as e:
        yield e


def start_server(model_path, *extra):
    """`racer-local serve` on a free loopback port: (process, base URL) once /health answers."""
    import httpx

    from racer_local.llama_server import free_port

    port = free_port()
    cmd = [sys.executable, "-c", "from racer_local.cli import main; main()", "serve", "--model",
           str(model_path), "--port", str(port), "--n-ctx", "1024", "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start within 120 s")
