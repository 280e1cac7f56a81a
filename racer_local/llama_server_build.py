"""The peer binary: llama.cpp's own `llama-server`, compiled from the very source and flags the
binding was built with, so that the peer and racer-local run identical kernels.

llama-cpp-python's sdist vendors llama.cpp (vendor/llama.cpp). install.sh records the sdist and
the CMAKE_ARGS it chose in the venv (share/racer-local/build.json); the binary is cached beside
the wheel cache under the same key and reused. Nothing prebuilt is downloaded: the only download
is the sdist itself from PyPI, when install.sh has not kept it. A user's own binary is taken as
given (`--llama-server PATH` or RACER_LOCAL_LLAMA_SERVER).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from racer_local.errors import RacerError

ENV_BINARY = "RACER_LOCAL_LLAMA_SERVER"
RECORD = Path(sys.prefix) / "share" / "racer-local" / "build.json"  # written by install.sh
# Off: what would download at build time (the web UI from a hub bucket) or link what the bench
# never uses (curl, OpenSSL); on: a static, release binary.
PEER_FLAGS = ("-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_BUILD_TYPE=Release")


class PeerBuildError(RacerError):
    """llama-server could not be found or built; the message says why and what to do."""


@dataclass(frozen=True)
class Build:
    """How the binding was compiled, and so how the peer must be."""

    version: str  # llama-cpp-python's
    cmake_args: str
    key: str  # install.sh's wheel-cache key for this version, flag set and Python
    cache: Path  # racer-local's build cache: wheels/, sdist/, llama-server/
    recorded: bool  # False: install.sh left no record, the flags are CMAKE_ARGS or llama.cpp's defaults

    @property
    def binary(self) -> Path:
        return self.cache / "llama-server" / self.key / "llama-server"

    @property
    def sdist(self) -> Path:
        return self.cache / "sdist" / f"llama_cpp_python-{self.version}.tar.gz"


def current_build() -> Build:
    """The record install.sh wrote, else the same key computed from this environment."""
    try:
        rec = json.loads(RECORD.read_text())
        return Build(rec["llama_cpp_python"], rec["cmake_args"], rec["key"], Path(rec["cache"]), True)
    except (OSError, ValueError, KeyError):
        pass
    version = importlib.metadata.version("llama-cpp-python")
    args = os.environ.get("CMAKE_ARGS", "")
    key = hashlib.sha256(f"{version} {args} {sys.version}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "racer-local"
    return Build(version, args, key, root, False)


def find(explicit: str | os.PathLike | None = None) -> Path | None:
    """The binary to use without building: the one given (option or environment), else the cached
    build for this binding; None when there is none yet."""
    given = explicit or os.environ.get(ENV_BINARY)
    if given:
        path = Path(given).expanduser()
        resolved = path if path.is_file() else shutil.which(str(given))
        if not resolved or not os.access(resolved, os.X_OK):
            raise PeerBuildError(f"llama-server {str(given)!r} is not an executable file (from "
                                 f"--llama-server or {ENV_BINARY}); give the path of a built llama-server")
        return Path(resolved)
    binary = current_build().binary
    return binary if binary.is_file() else None


def find_or_build(explicit=None, echo: Callable[[str], None] = print) -> Path:
    """`find`, else compile llama-server for this binding (minutes, once; progress on `echo`)."""
    return find(explicit) or build(echo=echo)


def build(echo: Callable[[str], None] = print, jobs: int | None = None) -> Path:
    """Compile llama-server from the binding's sdist with its CMAKE_ARGS into the cache."""
    b = current_build()
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise PeerBuildError(f"building llama-server needs {tool} on PATH; install it "
                                 "(e.g. apt-get install cmake g++) or pass --llama-server PATH")
    out = b.binary.parent
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second bench waits for the first one's build
        if b.binary.is_file():
            return b.binary
        started = time.perf_counter()
        flags = b.cmake_args or "(none: llama.cpp's defaults)"
        echo(f"building llama-server from llama-cpp-python {b.version}'s vendored llama.cpp with "
             f"CMAKE_ARGS {flags}; this takes several minutes once (10 on 2 cores), log in {out}/build.log")
        if not b.recorded:
            echo(f"note: no build record at {RECORD} (install.sh writes it); using CMAKE_ARGS from the "
                 "environment, which may differ from the flags the binding was compiled with")
        source = _vendored_source(b, out / "src")
        _compile(source, out / "build", b.cmake_args, out / "build.log", jobs or os.cpu_count() or 1, echo)
        shutil.copy2(out / "build" / "bin" / "llama-server", out / "llama-server.tmp")
        os.replace(out / "llama-server.tmp", b.binary)
        seconds = time.perf_counter() - started
        (out / "build.json").write_text(json.dumps({"llama_cpp_python": b.version, "cmake_args": b.cmake_args,
                                                    "peer_flags": PEER_FLAGS, "seconds": round(seconds)}))
        shutil.rmtree(out / "src", ignore_errors=True)  # hundreds of MB, rebuilt from the sdist
        shutil.rmtree(out / "build", ignore_errors=True)
        echo(f"built {b.binary} in {seconds / 60:.1f} min")
        return b.binary


def _vendored_source(b: Build, dest: Path) -> Path:
    if not b.sdist.is_file():
        b.sdist.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "-d", str(b.sdist.parent), f"llama-cpp-python=={b.version}"]
        if subprocess.run(cmd).returncode != 0 or not b.sdist.is_file():
            raise PeerBuildError(f"could not download llama-cpp-python {b.version}'s sdist from PyPI into "
                                 f"{b.sdist.parent}; put {b.sdist.name} there, or pass --llama-server PATH")
    shutil.rmtree(dest, ignore_errors=True)
    prefix = f"llama_cpp_python-{b.version}/vendor/llama.cpp/"
    with tarfile.open(b.sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise PeerBuildError(f"{b.sdist} has no {prefix}: not a llama-cpp-python sdist")
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


def _compile(source: Path, build_dir: Path, cmake_args: str, log: Path, jobs: int, echo) -> None:
    from tqdm import tqdm

    configure = ["cmake", "-S", str(source), "-B", str(build_dir), *shlex.split(cmake_args), *PEER_FLAGS]
    compile_ = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)]
    with log.open("w") as f, tqdm(total=100, unit="%", desc="llama-server", file=sys.stderr) as bar:
        for cmd in (configure, compile_):
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                f.write(line)
                if m := re.match(r"\[\s*(\d+)%\]", line):
                    bar.update(int(m.group(1)) - bar.n)
            if proc.wait() != 0:
                f.flush()
                tail = log.read_text().splitlines()[-5:]
                raise PeerBuildError(f"building llama-server failed ({cmd[1]} exited {proc.returncode}); "
                                     f"see {log}. Last lines: " + " | ".join(tail))
