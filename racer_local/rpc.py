"""Layers on other machines through llama.cpp's own RPC backend (ggml-rpc): client and worker.

A worker (`racer-local rpc-worker`) serves its GPU, else its CPU, to one client at a time over
TCP. A client (`--rpc HOST:PORT,...`, `Engine(rpc=[...])`) places the model's repeating layers
on the workers, split by their free memory, and keeps the embeddings and the output layer
here: a logits row per draft-tree node crossing the network would cost more than a tree saves.
Every step then pays a round trip per worker however many tokens it verifies, which is where
verifying a tree in one step pays most.

ggml-rpc aborts the whole process when a worker cannot be reached or speaks another protocol
version, so each worker is probed here first (its HELLO, then its device count). Nothing can
catch a worker that dies mid-generation: llama.cpp aborts then too (the README says how an app
isolates the model in a child process). The protocol has no authentication and no encryption.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
from collections.abc import Iterable, Sequence

from racer_local.errors import RpcError

# RPC_PROTO_*_VERSION of ggml-rpc.h in the pinned llama-cpp-python (0.3.36); a worker must
# have the same major version and no newer minor one (ggml-rpc's own rule).
PROTOCOL = (7, 0, 0)
_HELLO, _DEVICE_COUNT = 14, 15  # rpc_cmd values (HELLO is fixed at 14 across versions)
_CAPS = 24  # RPC_CONN_CAPS_SIZE: transport capabilities; zeros ask for plain TCP
DEFAULT_PORT = 50052  # rpc-server's
PROBE_TIMEOUT_S = 10.0


def split_endpoint(text: str) -> tuple[str, int]:
    """'host:port' -> (host, port), or ValueError naming the text."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT})")
    return host, int(port)


def parse_endpoints(spec: str | Iterable[str]) -> list[str]:
    """'host:port,host:port' (or a list of them) -> checked 'host:port' strings, in order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    endpoints = []
    for item in items:
        try:
            endpoints.append("{}:{}".format(*split_endpoint(item)))
        except ValueError as e:
            raise ValueError(f"RPC worker {e}") from None
    if not endpoints:
        raise ValueError("no RPC workers given: pass HOST:PORT[,HOST:PORT...]")
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"an RPC worker is listed twice in {','.join(endpoints)}")
    return endpoints


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("closed")
        data += part
    return data


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> int:
    """Handshake with the worker at `endpoint` as llama.cpp would, then hang up; its device count.

    Raises RpcError with the reason instead of letting ggml-rpc abort the process."""
    host, port = split_endpoint(endpoint)
    me = "{}.{}.{}".format(*PROTOCOL)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise RpcError(f"cannot reach RPC worker {endpoint}: {e.strerror or e}; start one there "
                       f"with `racer-local rpc-worker --port {port}`") from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", _HELLO, _CAPS) + bytes(_CAPS))
            size = struct.unpack("<Q", _recv(sock, 8))[0]
            if size != 4 + _CAPS:
                raise RpcError(f"RPC worker {endpoint} answered the handshake in another protocol "
                               f"(this client speaks {me}): run the same racer-local version there")
            major, minor, patch = _recv(sock, size)[:3]
            if major != PROTOCOL[0] or minor > PROTOCOL[1]:
                raise RpcError(f"RPC worker {endpoint} speaks protocol {major}.{minor}.{patch}, this "
                               f"client {me}: run the same racer-local (llama.cpp) version on both")
            sock.sendall(struct.pack("<BQ", _DEVICE_COUNT, 0))
            size = struct.unpack("<Q", _recv(sock, 8))[0]
            (devices,) = struct.unpack("<I", _recv(sock, size)) if size == 4 else (0,)
        except TimeoutError:
            raise RpcError(f"RPC worker {endpoint} did not answer within {timeout:.0f} s: it is "
                           "serving another client (a worker serves one at a time) or it is not "
                           "an RPC worker") from None
        except (ConnectionError, OSError):
            raise RpcError(f"RPC worker {endpoint} closed the connection during the handshake: it "
                           f"is not an RPC worker, or runs an older llama.cpp (this client speaks "
                           f"{me})") from None
    if devices < 1:
        raise RpcError(f"RPC worker {endpoint} offers no devices")
    return devices


def _library(name: str) -> ctypes.CDLL:
    """One of the libraries llama-cpp-python ships (already loaded: the same handle)."""
    from pathlib import Path

    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    return load_shared_library(name, Path(llama_cpp.__file__).parent / "lib")


def _ggml() -> ctypes.CDLL:
    """ggml's C API (the binding exposes none of it)."""
    lib = _library("ggml")
    p = ctypes.c_void_p
    for name, args, res in [
        ("ggml_backend_reg_by_name", [ctypes.c_char_p], p),
        ("ggml_backend_reg_get_proc_address", [p, ctypes.c_char_p], p),
        ("ggml_backend_reg_dev_count", [p], ctypes.c_size_t),
        ("ggml_backend_reg_dev_get", [p, ctypes.c_size_t], p),
        ("ggml_backend_dev_count", [], ctypes.c_size_t),
        ("ggml_backend_dev_get", [ctypes.c_size_t], p),
        ("ggml_backend_dev_type", [p], ctypes.c_int),
        ("ggml_backend_dev_name", [p], ctypes.c_char_p),
    ]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _rpc_proc(lib: ctypes.CDLL, name: str, signature):
    import llama_cpp

    reg = lib.ggml_backend_reg_by_name(b"RPC") if llama_cpp.llama_supports_rpc() else None
    if not reg:
        raise RpcError("this llama-cpp-python was built without RPC: reinstall with ./install.sh "
                       "(it adds -DGGML_RPC=ON)")
    return signature(lib.ggml_backend_reg_get_proc_address(reg, name.encode()))


# The output layer's tensors (gemma ties its output to the token embedding, which llama.cpp then
# loads twice): kept in this machine's memory, so their matmul runs here.
OUTPUT_TENSORS = rb"^(output|output_norm|token_embd)\."


class _TensorBuftOverride(ctypes.Structure):  # llama_model_tensor_buft_override (llama.h)
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def place_on_workers(mparams, endpoints: Sequence[str]) -> tuple:
    """Set llama_model_params to put every layer on the workers' devices but the output layer;
    every worker is probed first. Returns the ctypes arrays mparams points into: keep them
    referenced until the model has loaded."""
    lib = _ggml()
    add_server = _rpc_proc(lib, "ggml_backend_rpc_add_server",
                           ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    for endpoint in endpoints:
        probe(endpoint)
    found = []
    for endpoint in endpoints:
        reg = add_server(endpoint.encode())
        if not reg:
            raise RpcError(f"RPC worker {endpoint} offers no devices")
        found += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
    devices = (ctypes.c_void_p * (len(found) + 1))(*found, None)
    cpu = _library("ggml-cpu")
    cpu.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    overrides = (_TensorBuftOverride * 2)()  # NULL-terminated
    overrides[0].pattern, overrides[0].buft = OUTPUT_TENSORS, cpu.ggml_backend_cpu_buffer_type()
    mparams.devices = ctypes.cast(devices, ctypes.c_void_p)
    mparams.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
    mparams.n_gpu_layers = -1  # every layer (llama.cpp counts the output layer as one: overridden)
    return devices, overrides


def serve(host: str, port: int, threads: int) -> None:
    """Serve this machine's GPUs (else its CPU) on host:port until killed; returns only if
    the server could not start."""
    import signal

    from racer_local.backend import init_llama

    init_llama()
    lib = _ggml()
    start = _rpc_proc(lib, "ggml_backend_rpc_start_server",
                      ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                       ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)))
    cpu, accel = 0, 3  # enum ggml_backend_dev_type: CPU, GPU, IGPU, ACCEL
    found = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    offered = [d for d in found if lib.ggml_backend_dev_type(d) not in (cpu, accel)]
    offered = offered or [d for d in found if lib.ggml_backend_dev_type(d) == cpu][:1]
    array = (ctypes.c_void_p * len(offered))(*offered)
    names = ", ".join(lib.ggml_backend_dev_name(d).decode() for d in offered)
    print(f"rpc-worker: serving {names} on {host}:{port} with {threads} threads "
          f"(protocol {'.'.join(map(str, PROTOCOL))}); Ctrl-C stops it", file=sys.stderr, flush=True)
    # The server loop never returns to Python, so Python's handler would never run: let the
    # signal end the process instead.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    start(f"{host}:{port}".encode(), None, threads, len(offered), array)
