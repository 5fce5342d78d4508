"""The tensor table and scalar keys of a GGUF file, read without its arrays.

gguf-py's GGUFReader builds a numpy view for every part of every key: a file with a 150k-token
vocabulary (its tokens, scores, types and merges) takes seconds to open. The summaries the export
and the quality table print (each tensor's type and shape, bits per weight) need only the tensor
infos that follow the metadata (and a few scalar keys: general.file_type, the imatrix file, the
context length), so this walks the header (GGUF v2/v3, little-endian: magic,
version, tensor count, key count, then each key's name, type and value; then each tensor's name,
dimensions, type and data offset) keeping the scalar values and skipping every array by its length: arrays of
numbers in one step, arrays of strings by their lengths. Tens of milliseconds on the same file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

# GGUF value types (gguf-py GGUFValueType): size in bytes of the fixed-size ones
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: int                 # GGML type number (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]    # as the file lists its dimensions (gguf-py's `shape`: fastest first)
    offset: int               # of its data, from the start of the data section

    @property
    def type_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.type).name

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.type)]
        return self.n_elements // block * size


class GGUFHeaderError(ValueError):
    """The file is not a GGUF this reader can walk (callers turn it into their one-line error)."""


@dataclass(frozen=True)
class GGUFHeader:
    scalars: dict            # key -> int, float or bool; strings as their bytes; array keys absent
    tensors: list            # [GGUFTensor] in file order


def read_tensor_table(path: str | os.PathLike) -> list[GGUFTensor]:
    """The tensor infos of the GGUF at `path`, in file order."""
    return read_header(path).tensors


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The scalar keys and tensor infos of the GGUF at `path`."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFHeaderError("shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _walk(m, size)


def _walk(m, size: int) -> GGUFHeader:
    if m[:4] != b"GGUF":
        raise GGUFHeaderError("no GGUF magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version not in (2, 3):
        raise GGUFHeaderError(f"GGUF version {version}")
    u32, u64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from
    pos = 24

    def need(n: int) -> None:
        if n < 0 or pos + n > size:
            raise GGUFHeaderError("the header runs past the end of the file")

    def skip_string() -> None:
        nonlocal pos
        need(8)
        (n,) = u64(m, pos)
        pos += 8
        need(n)
        pos += n

    def string() -> bytes:
        start = pos + 8
        skip_string()
        return bytes(m[start:pos])

    scalars = {}
    for _ in range(n_kv):
        key = string().decode("utf-8", "replace")
        need(4)
        (vtype,) = u32(m, pos)
        pos += 4
        if vtype == _ARRAY:
            need(12)
            (etype,) = u32(m, pos)
            (count,) = u64(m, pos + 4)
            pos += 12
            if etype == _STRING:
                for _ in range(count):
                    skip_string()
            elif etype in _SIZES:
                need(count * _SIZES[etype])
                pos += count * _SIZES[etype]
            else:  # arrays of arrays: gguf-py writes none; refuse rather than guess their layout
                raise GGUFHeaderError(f"an array of value type {etype}")
        elif vtype == _STRING:
            scalars[key] = string()
        elif vtype in _SIZES:
            need(_SIZES[vtype])
            (scalars[key],) = struct.unpack_from(_FORMATS[vtype], m, pos)
            pos += _SIZES[vtype]
        else:
            raise GGUFHeaderError(f"value type {vtype}")
    out = []
    for _ in range(n_tensors):
        need(8)
        (n,) = u64(m, pos)
        need(8 + n + 4)
        name = bytes(m[pos + 8:pos + 8 + n]).decode("utf-8", "replace")
        pos += 8 + n
        (ndim,) = u32(m, pos)
        pos += 4
        need(8 * ndim + 12)
        shape = struct.unpack_from(f"<{ndim}Q", m, pos)
        pos += 8 * ndim
        ttype, offset = struct.unpack_from("<IQ", m, pos)
        pos += 12
        out.append(GGUFTensor(name, ttype, tuple(int(d) for d in shape), int(offset)))
    return GGUFHeader(scalars, out)
