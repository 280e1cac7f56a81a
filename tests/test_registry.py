"""The model registry and `racer-local models` / `pull`, against a Hugging Face hub on loopback.

`LoopbackHub` answers the requests huggingface-hub's hf_hub_download makes, as the real hub
does for an LFS file: HEAD (and GET) /{repo}/resolve/{revision}/{file} -> 302 to a CDN URL on
another origin, with X-Repo-Commit, X-Linked-Etag (the sha256) and X-Linked-Size; the CDN
serves the bytes with Range support. It can corrupt a file (same size, one byte flipped) or
drop the connection halfway through the first transfer. Registry entries pointing at it come
from a TOML file named by RACER_LOCAL_MODELS; the hub cache and racer-local's home are in tmp.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from click.testing import CliRunner
from huggingface_hub import constants as hf_constants

from racer_local import models
from racer_local.cli import main
from racer_local.errors import ModelError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "loopback/tiny-GGUF"


def tiny_gguf(n_floats: int = 32768) -> bytes:
    """A well-formed GGUF (one f32 tensor, 128 KiB of data) that check_gguf accepts."""
    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    head += string(b"general.architecture") + struct.pack("<I", 8) + string(b"toy")
    head += string(b"t") + struct.pack("<IQIQ", 1, n_floats, 0, 0)
    head += b"\0" * (-len(head) % 32)
    return head + struct.pack(f"<{n_floats}f", *(float(i % 97) for i in range(n_floats)))


@dataclass
class Served:
    data: bytes | Path
    sha256: str  # what the hub advertises (the true sha256 of the good file)
    corrupt: bool = False

    def size(self) -> int:
        return self.data.stat().st_size if isinstance(self.data, Path) else len(self.data)

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.data, Path):
            with self.data.open("rb") as f:
                f.seek(start)
                out = f.read(end - start)
        else:
            out = self.data[start:end]
        if self.corrupt and start <= self.size() // 2 < end:  # flip one byte in the middle
            i = self.size() // 2 - start
            out = out[:i] + bytes([out[i] ^ 0xFF]) + out[i + 1 :]
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_HEAD(self):
        self.server.hub.handle(self, head=True)

    def do_GET(self):
        self.server.hub.handle(self, head=False)


class LoopbackHub:
    def __init__(self) -> None:
        self.files: dict[tuple[str, str], Served] = {}
        self.log: list[tuple[str, str, str | None, str]] = []  # method, path, Range, server
        self.drop_next_transfer = False
        self.servers = []
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.hub, server.role, server.daemon_threads = self, role, True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
            self.servers.append(server)
        self.url, self.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()

    def add(self, filename: str, data: bytes | Path, *, corrupt: bool = False) -> str:
        sha = _sha256(data)
        self.files[(REPO, filename)] = Served(data, sha, corrupt)
        return sha

    def handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        self.log.append((req.command, path, req.headers.get("Range"), req.server.role))
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if req.server.role == "hub" and resolve:
            repo, _, filename = resolve.groups()
            served = self.files.get((repo, filename))
            if served is None:
                return self._reply(req, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            return self._reply(req, 302, {
                "Location": f"{self.cdn}/blobs/{served.sha256}", "X-Repo-Commit": COMMIT,
                "X-Linked-Etag": f'"{served.sha256}"', "X-Linked-Size": str(served.size()),
                "ETag": '"a-git-blob-id"'})
        blob = re.fullmatch(r"/blobs/([0-9a-f]{64})", path)
        served = next((f for f in self.files.values() if blob and f.sha256 == blob.group(1)), None)
        if req.server.role != "cdn" or served is None:
            return self._reply(req, 404, {})
        size, start = served.size(), 0
        headers = {"ETag": f'"{served.sha256}"', "Accept-Ranges": "bytes"}
        wanted = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range") or "")
        if wanted:
            start = int(wanted.group(1))
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        headers["Content-Length"] = str(size - start)
        self._reply(req, 206 if wanted else 200, headers, end=False)
        if head:
            return
        stop = size
        if self.drop_next_transfer:  # send half, then hang up
            self.drop_next_transfer, stop = False, start + (size - start) // 2
        for lo in range(start, stop, 1 << 20):
            req.wfile.write(served.read(lo, min(lo + (1 << 20), stop)))
        if stop < size:
            req.close_connection = True

    @staticmethod
    def _reply(req, status: int, headers: dict, end: bool = True) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        if end and "Content-Length" not in headers:
            req.send_header("Content-Length", "0")
        req.end_headers()

    def transfers(self) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == "GET" and entry[3] == "cdn"]


def _sha256(data: bytes | Path) -> str:
    if isinstance(data, Path):
        return models._sha256(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback hub, huggingface-hub pointed at it, and a tmp hub cache and home."""
    server = LoopbackHub()
    monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("RACER_LOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RACER_LOCAL_MODEL", raising=False)
    yield server
    server.close()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """write(**entries): a registry file with those hub entries, named by RACER_LOCAL_MODELS."""
    path = tmp_path / "models.toml"

    def write(**entries):
        lines = []
        for name, fields in entries.items():
            lines.append(f'[models."{name}"]')
            lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
        path.write_text("\n".join(lines) + "\n")
        monkeypatch.setenv(models.ENV_REGISTRY, str(path))
        return path

    return write


def entry(file="tiny.gguf", **extra) -> dict:
    return {"repo": REPO, "file": file, "quantization": "F32", "size_mb": 1, **extra}


def cli(*args):
    return CliRunner().invoke(main, list(args))


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def cache_files(tmp_path) -> list[Path]:
    """Blobs and snapshot links in the hub cache (not its refs, locks or CACHEDIR.TAG)."""
    return [p for p in (tmp_path / "hub").rglob("*")
            if (p.is_file() or p.is_symlink()) and ({"blobs", "snapshots"} & set(p.parts))]


# ----- the happy path -----------------------------------------------------------------------------


def test_pull_downloads_verifies_and_then_the_name_resolves(hub, registry, tmp_path):
    data = tiny_gguf()
    sha = hub.add("tiny.gguf", data)
    registry(tiny=entry(sha256=sha))
    assert "not downloaded" in _status_line(cli("models").output, "tiny")
    with pytest.raises(ModelError, match="racer-local pull tiny"):
        models.resolve_model("tiny")

    result = cli("pull", "tiny")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == data
    assert str(path).startswith(str(tmp_path / "hub"))  # huggingface-hub's cache, not ours
    assert path.resolve().name == sha  # the blob is stored under its LFS ETag
    assert models.resolve_model("tiny") == path
    assert "present" in _status_line(cli("models").output, "tiny")
    heads = [e for e in hub.log if e[0] == "HEAD"]
    assert heads and heads[0][1] == f"/{REPO}/resolve/main/tiny.gguf"
    assert len(hub.transfers()) == 1

    # A second pull finds it verified in the cache and transfers nothing.
    assert cli("pull", "tiny").exit_code == 0
    assert len(hub.transfers()) == 1


def _status_line(listing: str, name: str) -> str:
    return next(line for line in listing.splitlines() if line[2:].startswith(name + " "))


def test_a_dropped_connection_resumes_where_it_stopped(hub, registry, monkeypatch):
    # huggingface-hub writes what it received in DOWNLOAD_CHUNK_SIZE pieces (10 MB) and resumes
    # after the last one; smaller pieces let a small file show it.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    data = tiny_gguf()
    registry(tiny=entry())  # no sha256 in the registry: the hub's LFS sha256 is checked
    hub.add("tiny.gguf", data)
    hub.drop_next_transfer = True
    path = models.pull(models.load_registry()[1]["tiny"])
    assert path.read_bytes() == data
    first, second = hub.transfers()
    assert first[2] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second[2]).group(1))
    assert len(data) // 2 - 8192 < resumed_at <= len(data) // 2


# ----- corrupt downloads --------------------------------------------------------------------------


@pytest.mark.parametrize("known_sha", [True, False], ids=["registry-sha256", "hub-sha256"])
def test_a_corrupt_download_is_rejected_deleted_and_never_used(hub, registry, tmp_path, known_sha):
    data = tiny_gguf()
    sha = hub.add("tiny.gguf", data, corrupt=True)
    registry(tiny=entry(**({"sha256": sha} if known_sha else {})))
    line = error_line(cli("pull", "tiny"))
    assert "'tiny' is corrupt" in line and sha in line and "deleted" in line and "pull tiny" in line
    assert cache_files(tmp_path) == []
    with pytest.raises(ModelError, match="not downloaded yet"):
        models.resolve_model("tiny")
    assert "not downloaded" in _status_line(cli("models").output, "tiny")
    # Once the hub serves it intact, pulling again works.
    hub.files[(REPO, "tiny.gguf")].corrupt = False
    assert cli("pull", "tiny").exit_code == 0
    assert models.resolve_model("tiny").read_bytes() == data


def test_a_file_damaged_in_the_cache_is_refused_and_pull_replaces_it(hub, registry):
    data = tiny_gguf()
    hub.add("tiny.gguf", data)
    registry(tiny=entry())
    path = models.pull(models.load_registry()[1]["tiny"])
    blob = path.resolve()
    blob.write_bytes(data[:-1] + b"\x00")  # damaged after the download (same size)
    with pytest.raises(ModelError, match="corrupt.*racer-local pull tiny"):
        models.resolve_model("tiny")
    assert cli("pull", "tiny").exit_code == 0
    assert models.resolve_model("tiny").read_bytes() == data
    assert len(hub.transfers()) == 2


def test_a_missing_file_on_the_hub_is_one_error_line(hub, registry):
    registry(ghost=entry(file="ghost.gguf"))
    assert "could not download 'ghost'" in error_line(cli("pull", "ghost"))


def test_an_unknown_name_is_refused(hub):
    result = cli("pull", "no-such-model")
    assert result.exit_code != 0 and "unknown model 'no-such-model'" in result.output


# ----- registry entries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fields, message",
    [("../escape", entry(), "a model name is"),
     ("a/b", entry(), "a model name is"),
     ("dots..", entry(), "without '..'"),
     ("ok", entry(file="../../outside.gguf"), "relative path"),
     ("ok", entry(file="/etc/model.gguf"), "relative path"),
     ("ok", entry(file="sub\\..\\x.gguf"), "relative path"),
     ("ok", entry(file="model.bin"), "relative path to a .gguf"),
     ("ok", {"package": "p", "file": "sub/model.gguf"}, "relative path"),
     ("ok", entry(repo="../../x"), "hub repo id"),
     ("ok", {**entry(), "package": "p"}, "exactly one of"),
     ("ok", entry(sha256="abc"), "sha256"),
     ("ok", entry(colour="blue"), "unknown fields")],
)
def test_registry_entries_that_could_escape_or_are_malformed_are_refused(registry, name, fields, message):
    registry(**{name: fields})
    with pytest.raises(ModelError, match=re.escape(message)):
        models.load_registry()


def test_a_subfolder_file_in_a_hub_repo_is_allowed(registry):
    registry(sub=entry(file="Q4_K_M/model.gguf"))
    assert models.load_registry()[1]["sub"].file == "Q4_K_M/model.gguf"


def test_the_packaged_registry_is_valid_and_lists_the_curated_models(monkeypatch):
    monkeypatch.delenv(models.ENV_REGISTRY, raising=False)
    default, entries = models.load_registry()
    assert entries[default].package  # the embedded model needs no network
    for family in ("qwen2.5-0.5b", "qwen2.5-7b", "llama3.2-1b", "llama3.2-3b", "gemma3-1b", "gemma3-4b",
                   "mistral-7b"):
        assert any(name.startswith(family) for name in entries), family
    for e in entries.values():
        assert e.quantization and e.size_mb > 0


# ----- end to end: the real model through the loopback hub, then --model NAME --------------------


def test_pull_then_generate_with_the_pulled_model(hub, registry, tmp_path, model_path):
    """The real CLI in a subprocess, pointed at the loopback hub by HF_ENDPOINT alone."""
    sha = hub.add("gemma-3-270m-q4_k_m.gguf", Path(model_path))
    registry(pulled=entry(file="gemma-3-270m-q4_k_m.gguf", sha256=sha))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    exe = str(Path(sys.executable).with_name("racer-local"))
    pulled = subprocess.run([exe, "pull", "pulled"], env=env, capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    assert Path(pulled.stdout.strip()).resolve().name == sha
    out = subprocess.run([exe, "generate", "The capital of France is", "--model", "pulled", "-n", "4",
                          "--method", "ar", "--json", "--threads", "2", "--n-ctx", "256"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["tokens"]) >= 1
