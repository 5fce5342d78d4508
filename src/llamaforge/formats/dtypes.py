"""Tensor dtypes and sizes: safetensors <-> torch dtype names, `TensorInfo`, size strings ("5GB"),
and positioned reads into a tensor buffer.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import LlamaforgeError

if TYPE_CHECKING:
    import torch

# safetensors dtype codes: bytes per element, and which are floating point. torch's dtypes are
# looked up only where a tensor is made (`st_to_torch`): reading headers and copying bytes need none.
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
ST_FLOAT = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}
_TORCH_TABLES: dict = {}


def st_to_torch() -> dict:
    """{safetensors code: torch dtype} (imports torch; codes this torch lacks are left out)."""
    if not _TORCH_TABLES:
        import torch

        st = {code: getattr(torch, n) for code, n in _TORCH_NAMES.items() if hasattr(torch, n)}
        _TORCH_TABLES.update(st=st, torch={v: k for k, v in st.items()},
                             named={"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32})
    return _TORCH_TABLES["st"]


def torch_to_st() -> dict:
    st_to_torch()
    return _TORCH_TABLES["torch"]


DTYPE_NAMES = ("float16", "bfloat16", "float32")  # the dtypes a merge or an import may write


def __getattr__(name: str):
    # ST_TO_TORCH, TORCH_TO_ST, DTYPES: the tables, built (and torch imported) on first use
    if name == "ST_TO_TORCH":
        return st_to_torch()
    if name == "TORCH_TO_ST":
        return torch_to_st()
    if name == "DTYPES":
        st_to_torch()
        return _TORCH_TABLES["named"]
    raise AttributeError(name)


_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b)\s*$", re.IGNORECASE)


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise LlamaforgeError(f"cannot read the size {text!r}", None, "write it like 5GB, 500MB or 2GiB")
    unit = m.group(2).lower()
    if unit not in _UNITS:  # "ib"
        raise LlamaforgeError(f"cannot read the size {text!r}", None, "write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def pread_into(fd: int, buf, offset: int, path: Path, name: str) -> None:
    """Fill the uint8 buffer `buf` (a torch tensor or a numpy array) with the file's bytes from
    `offset` (positional, so threads may share the descriptor); a short read means the file was cut off."""
    mv = memoryview(buf if type(buf).__module__ == "numpy" else buf.numpy()).cast("B")
    want = len(mv)
    done = 0
    while done < want:
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise LlamaforgeError(f"tensor {name} is truncated", path, "the file is incomplete: build it again")
        done += n


def torch_dtype(name: str) -> torch.dtype:
    try:
        return __getattr__("DTYPES")[name]
    except KeyError:
        raise LlamaforgeError(f"unknown dtype {name!r}", None, f"use one of {', '.join(DTYPE_NAMES)}") from None


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, dtype (its safetensors code: "F16", "BF16", ...; `dtype` gives torch's) and shape.
    Made with a torch dtype too (`TensorInfo(name, torch.float16, shape)`): it is kept as its code."""

    name: str
    code: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.code, str):
            object.__setattr__(self, "code", torch_to_st()[self.code])

    @property
    def dtype(self) -> torch.dtype:
        return st_to_torch()[self.code]

    @property
    def is_float(self) -> bool:
        return self.code in ST_FLOAT

    @property
    def itemsize(self) -> int:
        return ST_ITEMSIZE[self.code]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize
