"""Where model files come from: a path, a name in the model registry, or the embedded default.

The registry is the packaged models.toml, plus any files named in RACER_LOCAL_MODELS
(os.pathsep-separated; their entries add to or replace the packaged ones). The embedded model
ships on PyPI in chunks; it is assembled once into the cache directory (RACER_LOCAL_HOME,
default ~/.cache/racer-local) and checked against its sha256. Hub models are downloaded by
`pull` through huggingface-hub into its own cache (HF_HUB_CACHE; HF_ENDPOINT picks a mirror)
and checked against the registry's sha256, else against the hub's LFS ETag, which is the
file's sha256. A file that fails the check is deleted and never used. A successful check is
remembered (size and mtime) so a multi-GB file is hashed once, not on every start.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import tomllib
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path, PurePosixPath

from racer_local.errors import ModelError

ENV_REGISTRY = "RACER_LOCAL_MODELS"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # a model name: one path component
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    file: str  # the GGUF's file name (its path inside the hub repo, for hub models)
    description: str = ""
    package: str | None = None  # a PyPI package that carries the file (the embedded model)
    repo: str | None = None  # a Hugging Face hub repo id
    revision: str = "main"  # hub branch, tag or commit
    quantization: str = ""
    size_mb: int = 0
    sha256: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("RACER_LOCAL_HOME") or Path.home() / ".cache" / "racer-local")


def load_registry(path: str | Path | None = None) -> tuple[str, dict[str, ModelEntry]]:
    """(default model name, entries by name) from models.toml, or from `path` alone if given."""
    sources = [Path(path)] if path else [files("racer_local").joinpath("models.toml")]
    if not path:
        sources += [Path(p) for p in os.environ.get(ENV_REGISTRY, "").split(os.pathsep) if p]
    default, entries = None, {}
    for source in sources:
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ModelError(f"cannot read the model registry {source}: {e}") from None
        default = data.get("default", default)
        for name, spec in data.get("models", {}).items():
            entries[name] = _entry(name, spec, source)
    if default not in entries:
        raise ModelError(f"the model registry names default {default!r} but does not list it")
    return default, entries


def _entry(name: str, spec: dict, source) -> ModelEntry:
    """A registry entry, refused unless its names stay inside the directories they are joined to."""

    def bad(why: str) -> ModelError:
        return ModelError(f"model {name!r} in {source}: {why}")

    known = {f.name for f in fields(ModelEntry)} - {"name"}
    if not isinstance(spec, dict) or set(spec) - known:
        raise bad(f"unknown fields {sorted(set(spec) - known)}; known: {sorted(known)}")
    if not _NAME.match(name) or ".." in name:
        raise bad("a model name is letters, digits, '.', '_' and '-', without '..'")
    entry = ModelEntry(name=name, **spec)
    if bool(entry.package) == bool(entry.repo):
        raise bad("give exactly one of `package` (PyPI) and `repo` (hub)")
    parts = PurePosixPath(entry.file).parts
    if (not parts or "\\" in entry.file or entry.file.startswith("/")
            or any(p in (".", "..") for p in parts) or not entry.file.endswith(".gguf")
            or (entry.package and len(parts) != 1)):
        raise bad(f"file {entry.file!r} must be a relative path to a .gguf, without '..'")
    if entry.repo and not _REPO.match(entry.repo):
        raise bad(f"repo {entry.repo!r} is not a hub repo id (owner/name)")
    if entry.sha256 is not None and not _SHA256.match(entry.sha256):
        raise bad("sha256 must be 64 lowercase hex digits")
    return entry


def chat_model() -> str:
    """The registry's `chat_default` when its package is installed, else its `default`."""
    default, entries = load_registry()
    name = _registry_value("chat_default")
    if name in entries and is_present(entries[name]):
        return name
    return default


def _registry_value(key: str):
    value = None
    for source in [files("racer_local").joinpath("models.toml"),
                   *(Path(p) for p in os.environ.get(ENV_REGISTRY, "").split(os.pathsep) if p)]:
        try:
            value = tomllib.loads(source.read_text(encoding="utf-8")).get(key, value)
        except (OSError, tomllib.TOMLDecodeError):
            pass  # load_registry reports unreadable files
    return value


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
    try:
        _verify(entry, found)
    except ModelError as e:
        raise ModelError(f"{e}: run `racer-local pull {entry.name}` to download it again") from None
    return found


def is_present(entry: ModelEntry) -> bool:
    """On this machine (the package installed, or the file in the hub cache); not hashed here."""
    if entry.package:
        return importlib.util.find_spec(entry.package) is not None
    return _hub_cached(entry) is not None


def pull(entry: ModelEntry) -> Path:
    """Download a hub model (huggingface-hub's progress bar; a dropped connection resumes where
    it stopped), verify it, and return its path in the hub cache. A cached copy that fails the
    check is deleted and downloaded again; a fresh download that fails it is deleted too."""
    if entry.package:
        return _embedded(entry)
    cached = _hub_cached(entry)
    if cached is not None:
        try:
            _verify(entry, cached)
            return cached
        except ModelError:
            _evict(cached)
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id=entry.repo, filename=entry.file, revision=entry.revision))
    except _download_errors() as e:
        raise ModelError(f"could not download {entry.name!r} ({entry.repo}/{entry.file}): {e}") from None
    try:
        _verify(entry, path)
    except ModelError as e:
        _evict(path)
        again = f"run `racer-local pull {entry.name}` again"
        raise ModelError(f"{e}; the download was deleted: {again}") from None
    return path


def _download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]  # hub HTTP errors are OSErrors
    try:
        import httpx2  # the transport of recent huggingface-hub releases

        errors.append(httpx2.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def _verify(entry: ModelEntry, path: Path) -> None:
    """Check `path` against the registry's sha256, else the hub's (the blob's name is its ETag)."""
    expected = entry.sha256
    if expected is None and _SHA256.match(path.resolve().name):
        expected = path.resolve().name
    if expected is None:
        return  # a small non-LFS file: huggingface-hub checked its size
    stamp = cache_dir() / "verified" / f"{expected}.json"
    mark = {"path": str(path.resolve()), "fingerprint": _fingerprint(path)}
    try:
        if json.loads(stamp.read_text()) == mark:
            return
    except (OSError, ValueError):
        pass
    actual = _sha256(path)
    if actual != expected:
        raise ModelError(f"model {entry.name!r} is corrupt: its sha256 is {actual}, expected {expected}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(mark))


def _evict(path: Path) -> None:
    """Remove a hub-cache entry: the snapshot link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _hub_cached(entry: ModelEntry) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=entry.repo, filename=entry.file, revision=entry.revision)
    return Path(found) if isinstance(found, str) else None


def _embedded(entry: ModelEntry) -> Path:
    """Assemble the packaged model once; a stamp file saves re-hashing it on every start. A
    package that carries the file whole is used in place, without importing it."""
    spec = importlib.util.find_spec(entry.package)
    where = list(spec.submodule_search_locations or []) if spec else []
    if where and (Path(where[0]) / entry.file).is_file():
        return _packaged_file(entry, Path(where[0]) / entry.file)
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


def _packaged_file(entry: ModelEntry, path: Path) -> Path:
    """A GGUF inside an installed package, its sha256 checked once (a stamp in the cache)."""
    if not path.is_file():
        raise ModelError(f"the package {entry.package!r} has no {entry.file}: reinstall it")
    stamp = cache_dir() / "models" / (entry.file + ".verified")
    if stamp.exists() and stamp.read_text() == f"{path} {_fingerprint(path)}":
        return path
    if entry.sha256 and _sha256(path) != entry.sha256:
        raise ModelError(f"{path} does not match models.toml's sha256: reinstall {entry.package!r}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{path} {_fingerprint(path)}")
    return path


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
