"""A GGUF sanity check run before llama.cpp opens a file, and the header it reads.

llama.cpp trusts a file's header more than it should; a truncated download or a file that is
not a model should give the user a sentence, not a native crash. This reads the header, the
metadata and the tensor table, and checks that every tensor's data lies inside the file. It
does not validate tensor contents or the architecture: llama.cpp does that. The header it
returns tells output_layer.py where the output weights lie.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from racer_local.errors import ModelError

MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml type id -> (elements per block, bytes per block), for the types llama.cpp writes.
_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
}
_MAX_COUNT = 1 << 24  # more tensors or metadata keys than any real model: a corrupt header
Q8_0 = 8


@dataclass(frozen=True)
class Tensor:
    type: int  # ggml type id
    dims: tuple[int, ...]  # ggml order: dims[0] varies fastest (a matrix is (columns, rows))
    offset: int  # of its data, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, object]  # scalars, and strings as bytes; arrays are left out (None)
    tensors: dict[str, Tensor]


class _Reader:
    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.at = path, data, 0

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path} is not a usable GGUF model: {what} (offset {self.at}); "
                          "the file is probably truncated or corrupt: download it again")

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise self.fail("header ends early")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += size
        return value

    def count(self, what: str) -> int:
        n = self.take("Q")
        if n > _MAX_COUNT:
            raise self.fail(f"implausible {what} count {n}")
        return n

    def string(self) -> bytes:
        n = self.take("Q")
        if self.at + n > len(self.data):
            raise self.fail("a string runs past the end of the file")
        self.at += n
        return self.data[self.at - n : self.at]

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.take("I"), self.take("Q")
            if n > len(self.data) - self.at:  # every item takes a byte at least
                raise self.fail(f"an array of {n} items runs past the end of the file")
            if item_type in _SCALARS:  # skip fixed-size arrays (token scores...) in one step
                size = struct.calcsize(_SCALARS[item_type]) * n
                if self.at + size > len(self.data):
                    raise self.fail("an array runs past the end of the file")
                self.at += size
                return None
            for _ in range(n):
                self.value(item_type)
            return None
        raise self.fail(f"unknown metadata type {vtype}")


def check_gguf(path: str | Path) -> Header:
    """Raise ModelError with a clear sentence unless `path` looks like a whole GGUF model; return
    its header."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path} is empty (an interrupted download?); download it again")
    with path.open("rb") as f:
        head = f.read(4)
        if head != MAGIC:
            raise ModelError(f"{path} is not a GGUF model file (it does not start with 'GGUF')")
        # Metadata (vocabulary included) is a few MB at most; tensor data is not read.
        data = head + f.read(64 << 20)
    r = _Reader(path, data)
    r.at = 4
    version = r.take("I")
    if version not in (2, 3):
        raise r.fail(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.count("tensor"), r.count("metadata")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = r.string().decode("utf-8", "replace")
        metadata[key] = r.value(r.take("I"))
    alignment = metadata.get("general.alignment")
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
    end, table = 0, []
    for _ in range(n_tensors):
        name = r.string().decode("utf-8", "replace")
        n_dims = r.take("I")
        if n_dims > 8:
            raise r.fail(f"a tensor with {n_dims} dimensions")
        dims = tuple(r.take("Q") for _ in range(n_dims))
        n_elems = 1
        for d in dims:
            n_elems *= d
        ggml_type, offset = r.take("I"), r.take("Q")
        block, nbytes = _BLOCKS.get(ggml_type, (1, 0))  # unknown type: llama.cpp checks it
        table.append((name, ggml_type, dims, offset, n_elems // block * nbytes))
        end = max(end, offset + n_elems // block * nbytes)
    data_start = -(-r.at // alignment) * alignment
    if data_start + end > size:
        raise ModelError(
            f"{path} is truncated: its tensors need {data_start + end} bytes but the file has "
            f"{size}; download it again"
        )
    return Header(metadata, {name: Tensor(t, dims, data_start + offset, nbytes)
                             for name, t, dims, offset, nbytes in table})
