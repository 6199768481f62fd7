"""A bounded reader of a GGUF file's header (metadata and tensor table); standard library only.

Why not ``gguf.GGUFReader``: it builds a numpy view per element of every metadata array (~6 s
for SmolLM2's 49k-token vocabulary) and fails on a corrupt file with whatever numpy or struct
raises. Here arrays are skipped (their element type and length are kept), every length is
checked against the file size before it is used, and any fault is one ``CheckpointError`` line
naming the file and the byte offset. Only little-endian GGUF v2/v3 is read (what llama.cpp and
the ``gguf`` package write).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ecospa_deploy.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4            # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2     # arrays of arrays are legal; deeper nesting is never written
# GGUF value types (gguf.GGUFValueType): fixed-size scalars by struct format; 8 string; 9 array.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array, kept as its element type and length (its elements are skipped)."""
    element_type: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]      # PyTorch order (GGUF stores the fastest dimension first)
    ggml_type: int              # gguf.GGMLQuantizationType value
    offset: int                 # absolute byte offset of the data in the file


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]    # scalars and strings as values, arrays as ArrayInfo
    tensors: dict[str, TensorEntry]
    file_size: int

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise CheckpointError(f"{self.path}: GGUF metadata has no general.architecture "
                                  "string; expected one such as 'llama'")
        return arch


class _Cursor:
    """Reads from a file, refusing any read past its end with the offset in the message."""

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt GGUF header at byte {self.f.tell()}: {why}")

    def read(self, n: int) -> bytes:
        if n > self.size - self.f.tell():
            raise self.fail(f"needs {n} more bytes, the file has {self.size} in all (truncated?)")
        return self.f.read(n)

    def skip(self, n: int) -> None:
        if n > self.size - self.f.tell():
            raise self.fail(f"needs {n} more bytes, the file has {self.size} in all (truncated?)")
        self.f.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.read(self.unpack("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not valid UTF-8") from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise self.fail(f"value type {kind} is unknown; expected 0-12")
        element, length = self.unpack("<I"), self.unpack("<Q")
        if element in SCALARS:
            self.skip(length * struct.calcsize(SCALARS[element]))
        elif element == STRING:
            for _ in range(length):
                self.skip(self.unpack("<Q"))
        elif element == ARRAY and depth < MAX_ARRAY_DEPTH:
            for _ in range(length):
                self.value(ARRAY, depth + 1)
        else:
            raise self.fail(f"array element type {element} is unknown or nested too deeply")
        return ArrayInfo(element, length)


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file, every field checked; weights are not read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        cur = _Cursor(f, path, size)
        magic = f.read(4)
        if magic != MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}; expected "
                                  f"{MAGIC!r})")
        version = cur.unpack("<I")
        if version not in VERSIONS:
            raise CheckpointError(f"{path}: GGUF version {version} is not supported; expected "
                                  f"one of {list(VERSIONS)} (little-endian)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in metadata:
                raise cur.fail(f"metadata key {key[:100]!r} appears twice")
            metadata[key] = cur.value(cur.unpack("<I"))
        entries = [_tensor_entry(cur) for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not (isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0):
            raise cur.fail(f"general.alignment={alignment!r}; expected a power of two")
        data_start = -(-f.tell() // alignment) * alignment
    tensors: dict[str, TensorEntry] = {}
    for name, shape, kind, offset in entries:
        if name in tensors:
            raise CheckpointError(f"{path}: GGUF tensor {name[:100]!r} appears twice")
        if offset % alignment:
            raise CheckpointError(f"{path}: GGUF tensor {name[:100]!r} starts at offset {offset}, "
                                  f"not a multiple of the alignment {alignment}")
        tensors[name] = TensorEntry(name, shape, kind, data_start + offset)
    return GGUFHeader(path, version, metadata, tensors, size)


def _tensor_entry(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string()
    n_dims = cur.unpack("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name[:100]!r} has {n_dims} dimensions; expected 1-{MAX_DIMS}")
    dims = [cur.unpack("<Q") for _ in range(n_dims)]
    kind, offset = cur.unpack("<I"), cur.unpack("<Q")
    return name, tuple(reversed(dims)), kind, offset


__all__ = ["GGUFHeader", "TensorEntry", "ArrayInfo", "read_header", "MAGIC"]
