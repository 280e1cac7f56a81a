"""check_gguf: whole models pass; broken files give a ModelError sentence, not a native crash.

Broken files are crafted here with struct (the layout is in gguf.py and the GGUF spec); a
well-formed crafted file is accepted first, so each rejection is due to the one defect.
"""

from __future__ import annotations

import struct

import pytest

from racer_local.errors import ModelError
from racer_local.gguf import check_gguf

U32, STRING, ARRAY = 4, 8, 9
F32 = 0


def string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def kv_string(key: bytes, value: bytes) -> bytes:
    return string(key) + struct.pack("<I", STRING) + string(value)


def kv_u32(key: bytes, value: int) -> bytes:
    return string(key) + struct.pack("<II", U32, value)


def kv_array(key: bytes, item_type: int, n: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<IIQ", ARRAY, item_type, n) + payload


def tensor(name: bytes, dims: tuple[int, ...], ggml_type: int = F32, offset: int = 0) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


ARCH = (kv_string(b"general.architecture", b"toy"),)
TWO_F32 = (tensor(b"a", (4, 2)), tensor(b"b", (8,), offset=32))  # 2 x 32 bytes


def gguf(
    kvs=ARCH,
    tensors=TWO_F32,
    *,
    data: int = 64,
    alignment: int = 32,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
) -> tuple[bytes, int]:
    """(file bytes, header length): header, padding to `alignment`, `data` bytes of tensors."""
    head = b"GGUF" + struct.pack("<IQQ", version,
                                 len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    pad = -len(head) % alignment
    return head + b"\0" * pad + b"\1" * data, len(head)


@pytest.fixture
def write(tmp_path):
    def write(data: bytes, name: str = "model.gguf"):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


def rejected(path) -> str:
    with pytest.raises(ModelError) as info:
        check_gguf(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


# ----- accepted -----------------------------------------------------------------------------------


def test_the_embedded_model_is_accepted(model_path):
    check_gguf(model_path)


def test_a_well_formed_crafted_file_is_accepted(write):
    check_gguf(write(gguf()[0]))


def test_metadata_arrays_and_alignment_are_understood(write):
    tokens = b"".join(string(t) for t in (b"<s>", b"a", b"b"))
    kvs = (
        kv_string(b"general.architecture", b"toy"),
        kv_array(b"tokenizer.ggml.tokens", STRING, 3, tokens),
        kv_array(b"tokenizer.ggml.scores", 6, 3, struct.pack("<3f", 0, 1, 2)),
        kv_array(b"nested", ARRAY, 1, struct.pack("<IQ", U32, 2) + struct.pack("<2I", 7, 8)),
        kv_u32(b"general.alignment", 64),
    )
    check_gguf(write(gguf(kvs, alignment=64)[0]))


# ----- rejected -----------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    assert "not found" in rejected(tmp_path / "nope.gguf")
    assert "not a file" in rejected(tmp_path)


def test_empty_file(write):
    assert "empty" in rejected(write(b""))


@pytest.mark.parametrize("head", [b"GGML", b"\x7fELF", b"<htm", b"GG", b'{"error": "not found"}'])
def test_wrong_magic(write, head):
    assert "not a GGUF" in rejected(write(head + gguf()[0][4:]))


@pytest.mark.parametrize("version", [0, 1, 4, 3 << 24])  # 3 << 24: a big-endian version 3
def test_unsupported_version(write, version):
    assert f"unsupported GGUF version {version}" in rejected(write(gguf(version=version)[0]))


def test_a_header_cut_short_anywhere(write):
    data, header = gguf()
    for cut in range(4, header):
        message = rejected(write(data[:cut]))
        assert "truncated" in message, cut


def test_truncated_tensor_data(write):
    data, _ = gguf(data=64)
    check_gguf(write(data))
    assert "is truncated: its tensors need" in rejected(write(data[:-1]))


def test_truncation_respects_general_alignment(write):
    kvs = (kv_u32(b"general.alignment", 256),)
    data, header = gguf(kvs, tensors=(tensor(b"a", (8,)),), data=32, alignment=256)
    check_gguf(write(data))
    assert -header % 32 < -header % 256  # with alignment 32 the cut file would look whole
    assert "is truncated" in rejected(write(data[:-1]))


def test_a_truncated_copy_of_the_real_model(model_path, write):
    with open(model_path, "rb") as f:
        head = f.read(16 << 20)  # the whole header (~6.5 MB) and some tensors
    assert "is truncated" in rejected(write(head))
    assert "truncated" in rejected(write(head[: 1 << 20]))  # inside the vocabulary


BIG = 1 << 40


@pytest.mark.parametrize(
    "broken, message",
    [
        pytest.param(dict(n_tensors=BIG), "implausible tensor count", id="tensors"),
        pytest.param(dict(n_kv=1 << 63), "implausible metadata count", id="kv"),
        pytest.param(dict(kvs=(struct.pack("<Q", BIG) + b"key",)), "string runs past", id="string"),
        pytest.param(dict(kvs=(kv_array(b"tokens", STRING, BIG, b""),)), "runs past", id="strings"),
        pytest.param(dict(kvs=(kv_array(b"scores", 6, BIG, b""),)), "runs past", id="floats"),
        pytest.param(dict(kvs=(string(b"k") + struct.pack("<I", 99),)), "unknown metadata type 99",
                     id="type"),
        pytest.param(dict(tensors=(tensor(b"a", (1,) * 9),)), "9 dimensions", id="dims"),
        pytest.param(dict(tensors=(tensor(b"a", (BIG, 1 << 20)),)), "is truncated", id="elements"),
        pytest.param(dict(tensors=(tensor(b"a", (8,), offset=BIG),)), "is truncated", id="offset"),
    ],
)
def test_implausible_counts_and_values(write, broken, message):
    assert message in rejected(write(gguf(**broken)[0]))

