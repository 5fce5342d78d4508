"""Tensor dtypes and sizes: safetensors <-> torch dtype names, `TensorInfo`, size strings ("5GB"),
and positioned reads into a tensor buffer.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LlamaforgeError

# safetensors dtype codes <-> torch dtypes
ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_code] = getattr(torch, _attr)


TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def pread_into(fd: int, buf: torch.Tensor, offset: int, path: Path, name: str) -> None:
    """Fill the uint8 tensor `buf` with the file's bytes from `offset` (positional, so threads may
    share the descriptor); a short read means the file was cut off."""
    want = buf.numel()
    mv = memoryview(buf.numpy())
    done = 0
    while done < want:
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise LlamaforgeError(f"tensor {name} is truncated", path, "the file is incomplete: build it again")
        done += n


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise LlamaforgeError(f"unknown dtype {name!r}", None, f"use one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()
