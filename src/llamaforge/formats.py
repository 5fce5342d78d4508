"""Tensor sources and the safetensors sink, which the stream (llamaforge.stream) reads and writes.

Sources give names, dtypes and shapes up front, and data a block of rows at a time:
  * safetensors files are parsed here (an 8-byte header length, a JSON header, raw bytes) and
    validated as strictly as the safetensors library does. A block is read with `pread` into the
    caller's buffer (`read_flat`), or, for the merge, viewed in the page cache (`view_flat`: no copy;
    its pages are dropped from the resident set once used, so RSS stays flat).
  * `.bin` / `.pth` pickles are opened with `torch.load(mmap=True, weights_only=True)`, so no code in
    them runs and tensors stay on disk until one is copied out.

The sink writes safetensors shards whose headers are computed up front from the planned names,
dtypes and shapes; each tensor's bytes are then appended in order, hashed on the way.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import LlamaforgeError
from .stream import HashingWriter

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


# ---------------------------------------------------------------------------------------------
# sources


class SafetensorsFile:
    """Lazy reader of one .safetensors file; validates the header against the file size."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fix = "the file is damaged or incomplete: download or build it again"
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise LlamaforgeError("weights file not found", self.path, "check the folder and its index file") from None
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise LlamaforgeError("not a safetensors file (shorter than its 8-byte header length)", self.path, fix)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise LlamaforgeError("not a safetensors file (header length beyond the end of the file)", self.path, fix)
        try:
            header = json.loads(self._f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
        except _DuplicateKey as e:
            raise LlamaforgeError(f"corrupt safetensors header (the key {e.args[0]!r} appears twice)", self.path,
                                  fix) from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise LlamaforgeError("corrupt safetensors header (not UTF-8 JSON)", self.path, fix) from None
        if not isinstance(header, dict):
            raise LlamaforgeError("corrupt safetensors header (not a JSON object)", self.path, fix)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise LlamaforgeError("corrupt safetensors header (__metadata__ is not a map of strings)", self.path, fix)
        self.metadata = metadata
        self._base = 8 + n
        self._mm: mmap.mmap | None = None
        self._entries = _check_entries(header, size - self._base, self.path, fix)

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][0]

    def _pread(self, buf: torch.Tensor, offset: int, name: str) -> None:
        """Fill the uint8 tensor `buf` from `offset` of the data section (positional: thread-safe)."""
        pread_into(self._f.fileno(), buf, self._base + offset, self.path, name)

    def get(self, name: str) -> torch.Tensor:
        info, start, end = self._entries[name]
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            self._pread(buf, start, name)
        return buf.view(info.dtype).reshape(info.shape)

    def byte_range(self, name: str) -> tuple[int, int]:
        """(file descriptor, offset in the file) of a tensor's bytes."""
        return self._f.fileno(), self._base + self._entries[name][1]

    def view_flat(self, name: str, first: int, count: int):
        """Elements [first, first+count) of `name` as a view of the memory-mapped file, and a
        function that drops those pages from this process's resident set once they are used.

        No copy is made: the bytes are read straight from the page cache. Dropping the pages
        (MADV_DONTNEED on a private, never-written mapping) is always safe: a later access
        faults them in again from the file.
        """
        info, start, _ = self._entries[name]
        item = info.dtype.itemsize
        offset, size = self._base + start + first * item, count * item
        if size == 0:
            return torch.empty(0, dtype=info.dtype), _nothing
        if self._mm is None:
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY)
        mm = self._mm
        view = torch.frombuffer(mm, dtype=torch.uint8, count=size, offset=offset).view(info.dtype)

        def release() -> None:
            lo = offset - offset % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, lo, offset + size - lo)

        return view, release

    def read_flat(self, name: str, first: int, count: int, buf: torch.Tensor) -> torch.Tensor:
        """Elements [first, first+count) of `name`, flattened, read into the uint8 buffer `buf`."""
        info, start, _ = self._entries[name]
        item = info.nbytes // max(1, info.numel)
        view = buf[: count * item]
        self._pread(view, start + first * item, name)
        return view.view(info.dtype)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes with it
                pass
            self._mm = None
        self._f.close()


def _nothing() -> None:
    pass


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entries(header: dict, data_len: int, path: Path, fix: str) -> dict[str, tuple[TensorInfo, int, int]]:
    """The tensor entries of a safetensors header, validated as strictly as the safetensors library
    does: a known dtype, a shape of non-negative integers, data offsets that match it, and tensors
    that tile the data section exactly (no overlap, no gap, nothing past the end)."""
    entries: dict[str, tuple[TensorInfo, int, int]] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise LlamaforgeError(f"corrupt safetensors header entry {name!r} (needs dtype, shape, data_offsets)",
                                  path, fix)
        code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str):
            raise LlamaforgeError(f"tensor {name} has the dtype {code!r}, not a dtype name", path, fix)
        if code not in ST_TO_TORCH:
            known = ", ".join(ST_TO_TORCH)
            raise LlamaforgeError(f"tensor {name} has dtype {code!r}, which llamaforge cannot read (it reads {known})",
                                  path, "convert the weights to F16, BF16 or F32 (e.g. with transformers) first")
        if not isinstance(shape, list) or not all(_int(d) for d in shape):
            raise LlamaforgeError(f"tensor {name} has the shape {shape!r}, not a list of integers", path, fix)
        if any(d < 0 for d in shape):
            raise LlamaforgeError(f"tensor {name} has a negative dimension in its shape {shape}", path, fix)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(x) for x in offsets)):
            raise LlamaforgeError(f"tensor {name} has data_offsets {offsets!r}, not two integers", path, fix)
        start, end = offsets
        info = TensorInfo(name, ST_TO_TORCH[code], tuple(shape))
        if start < 0 or end < start:
            raise LlamaforgeError(f"tensor {name} has data_offsets [{start}, {end}] that run backwards", path, fix)
        if end - start != info.nbytes:
            raise LlamaforgeError(f"tensor {name} has {end - start} data bytes but its shape {shape} and dtype {code} "
                                  f"need {info.nbytes}", path, fix)
        entries[name] = (info, start, end)
    pos, prev = 0, None
    for name, (_, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][1], kv[1][2])):
        if start < pos:
            raise LlamaforgeError(f"tensors {prev} and {name} overlap (bytes {start}..{pos})", path, fix)
        if start > pos:
            raise LlamaforgeError(f"a gap of {start - pos} bytes before tensor {name} (the data offsets must tile "
                                  "the data section)", path, fix)
        pos, prev = end, name
    if pos != data_len:
        what = (f"tensor {prev} ends at byte {pos} but the file has {data_len} data bytes" if pos > data_len else
                f"the tensors cover {pos} of the file's {data_len} data bytes")
        raise LlamaforgeError(what, path, fix)
    return entries


def torch_load(path: str | os.PathLike, what: str = "checkpoint"):
    """`torch.load` with weights_only=True (no pickle code runs) and mmap where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise LlamaforgeError(f"{what} not found", path, "check the folder and its index file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # legacy (pre-zipfile) torch.save format: cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure of torch.load is the file's
        raise torch_load_error(e, path, what) from None


def torch_load_error(e: Exception, path: Path, what: str = "checkpoint") -> LlamaforgeError:
    """The one line for a torch.load(weights_only=True) failure, never torch's advice to load with
    weights_only=False: a pickled object that is not a tensor is named and not run; anything else
    is a damaged file."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(e, pickle.UnpicklingError) and m:
        return LlamaforgeError(
            f"the {what} holds pickled objects that are not tensors ({m.group(1)}); llamaforge reads weights with "
            "weights_only=True and will not run them", path,
            "use the model's .safetensors files, or convert the checkpoint to safetensors where you trust it")
    first = "" if isinstance(e, pickle.UnpicklingError) else (text.splitlines()[0] if text else type(e).__name__)
    first = first if "weights_only" not in first else ""
    return LlamaforgeError(
        f"cannot read the {what} with torch.load(weights_only=True)" + (
            f": {first[:200]}" if first else " (not a zip or pickle that holds only tensors)"),
        path, "the file is damaged or incomplete, or not a checkpoint: download or build it again")


class TorchFile:
    """Lazy reader of one torch pickle (`pytorch_model*.bin`, `consolidated.NN.pth`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        sd = torch_load(self.path, "checkpoint")
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise LlamaforgeError("not a state dict of tensors", self.path, "point to a weights checkpoint")
        self._sd = sd

    def keys(self) -> list[str]:
        return list(self._sd)

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        return TensorInfo(name, t.dtype, tuple(t.shape))

    def get(self, name: str) -> torch.Tensor:
        # A copy in memory of its own: the mmap'd pages are dropped with the source.
        return self._sd[name].contiguous().clone()

    def read_flat(self, name: str, first: int, count: int, buf: torch.Tensor) -> torch.Tensor:
        t = self._sd[name]
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        item = t.element_size()
        view = buf[: count * item].view(t.dtype)
        view.copy_(flat[first: first + count])
        return view

    def close(self) -> None:
        self._sd = {}


def open_weights_file(path: str | os.PathLike):
    p = Path(path)
    if p.suffix == ".safetensors":
        return SafetensorsFile(p)
    return TorchFile(p)


class ModelSource:
    """All tensors of a Hugging Face model folder, single-file or sharded, safetensors or .bin.

    Every file's tensor directory is read when the source is made (safetensors headers; pickles
    are memory-mapped, not read), so names, dtypes and shapes are known before any data is.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LlamaforgeError("model folder not found", self.folder, "check the path in config.yaml or on the command line")
        self.files, self._where = self._layout()
        self._open: dict[str, object] = {}
        self._infos: dict[str, TensorInfo] = {}
        for f in self.files:
            src = self._file(f)
            for k in src.keys():
                if k in self._infos:
                    raise LlamaforgeError(f"tensor {k} appears in two weight files", self.folder / f,
                                          "remove the stray file from the folder")
                if self._where.get(k, f) != f:
                    raise LlamaforgeError(f"the index says {k} is in {self._where[k]}, but it is in {f}",
                                          self.folder, "rebuild the index file")
                self._infos[k] = src.info(k)
                self._where[k] = f
        missing = sorted(k for k in self._where if k not in self._infos)
        if missing:
            raise LlamaforgeError(f"the index lists tensors that no file holds: {', '.join(missing[:5])}",
                                  self.folder, "the download is incomplete: fetch the missing shards")

    def _layout(self) -> tuple[list[str], dict[str, str]]:
        d = self.folder
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    raise LlamaforgeError("corrupt index file (no weight_map)", index, "download it again") from None
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) and "/" not in v and v not in ("", ".", "..") for v in weight_map.values()):
                    raise LlamaforgeError("corrupt index file (weight_map must map tensor names to file names in "
                                          "the folder)", index, "download it again")
                files = sorted(set(weight_map.values()))
                for f in files:
                    if not (d / f).is_file():
                        raise LlamaforgeError(f"shard {f} listed in {index_name} is missing", d / f,
                                              "the download is incomplete: fetch the missing shard")
                return files, dict(weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (d / single).is_file():
                return [single], {}
        st = sorted(p.name for p in d.glob("*.safetensors"))
        if st:
            return st, {}
        bins = sorted(p.name for p in d.glob("pytorch_model*.bin"))
        if bins:
            return bins, {}
        if list(d.glob("consolidated.*.pth")):
            raise LlamaforgeError(
                "this is a Meta checkpoint (consolidated.*.pth), not a Hugging Face folder", d,
                "give it as the model's base in config.yaml (the pipeline converts it), or run scripts/import_pth.py",
            )
        raise LlamaforgeError(
            "no weights found (model.safetensors, model-*.safetensors with an index, or pytorch_model*.bin)", d,
            "point to a Hugging Face model folder",
        )

    def _file(self, name: str):
        src = self._open.get(name)
        if src is None:
            src = open_weights_file(self.folder / name)
            self._open[name] = src
        return src

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        return self._file(self._where[name]).get(name)

    def read_flat(self, name: str, first: int, count: int, buf: torch.Tensor) -> torch.Tensor:
        return self._file(self._where[name]).read_flat(name, first, count, buf)

    def file_of(self, name: str):
        return self._file(self._where[name])

    def byte_range(self, name: str) -> tuple[int, int] | None:
        """(file descriptor, offset) of a tensor's raw bytes when it lives in a safetensors file
        (for kernel-side copies), else None."""
        f = self.file_of(name)
        return f.byte_range(name) if isinstance(f, SafetensorsFile) else None

    def release(self, names: Iterable[str]) -> None:
        """Close the pickles whose tensors are all among `names` (copied out already): a
        memory-mapped pickle then gives its pages back. Safetensors files stay open, since views
        of their mapping may still be in use; their pages are dropped block by block instead."""
        done = set(names)
        for f in list(self._open):
            if isinstance(self._open[f], TorchFile) and all(
                    k in done for k, where in self._where.items() if where == f):
                self._open.pop(f).close()

    def weight_files(self) -> list[Path]:
        index = [self.folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                 if (self.folder / n).is_file()]
        return index + [self.folder / f for f in self.files]

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()


# ---------------------------------------------------------------------------------------------
# sink


def plan_shards(infos: Iterable[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Group tensors, in the given order, into shards of at most max_shard_bytes (one tensor may exceed)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards if shards[0] else []


def _header(tensors: list[TensorInfo], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write planned tensors, in plan order, into `model(-0000i-of-0000n).safetensors` + index.

    Each file's header is written first; `write_block()` then appends a tensor's bytes, block by
    block. Every file is hashed while it is written (`stream.HashingWriter`); `close()` returns the
    sha256 of each file.
    """

    def __init__(self, folder: str | os.PathLike, shards: list[list[TensorInfo]], prefix: str = "model",
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.shards = shards
        n = len(shards)
        self.names = [f"{prefix}.safetensors"] if n == 1 else [
            f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order: Iterator[tuple[int, TensorInfo]] = iter(
            [(i, t) for i, shard in enumerate(shards) for t in shard])
        self._shapes = {t.name: t.shape for shard in shards for t in shard}
        self._current = -1
        self._tensor: TensorInfo | None = None
        self._written = 0
        self._raw = None
        self._f: HashingWriter | None = None
        self.sha256: dict[str, str] = {}

    def _open_shard(self, i: int) -> None:
        self._close_shard()
        self._current = i
        self._raw = open(self.folder / self.names[i], "wb")
        self._f = HashingWriter(self._raw)
        self._f.write(_header(self.shards[i], self.metadata))

    def _close_shard(self) -> None:
        if self._f is not None:
            self._f.close()
            self.sha256[self.names[self._current]] = self._f.hexdigest
            self._f = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def _finish_tensor(self) -> None:
        if self._tensor is not None and self._written != self._tensor.nbytes:
            raise RuntimeError(f"{self._tensor.name}: wrote {self._written} bytes of {self._tensor.nbytes}")

    def write_block(self, name: str, block: torch.Tensor, done=None) -> None:
        """Append the next bytes of tensor `name` (a tensor's blocks, in order, then the next tensor).
        With `done`, return once written: `done()` is called when the block is hashed too (not at
        all if the write fails: the caller still owns the block)."""
        if self._tensor is None or self._tensor.name != name:
            self._finish_tensor()
            try:
                i, info = next(self._order)
            except StopIteration:
                raise RuntimeError(f"unplanned tensor {name}") from None
            if info.name != name:
                raise RuntimeError(f"tensor {name} written where the plan has {info.name}")
            self._tensor, self._written = info, 0
            if i != self._current:
                self._open_shard(i)
        if block.dtype != self._tensor.dtype:
            raise RuntimeError(f"tensor {name} is {block.dtype}, the plan says {self._tensor.dtype}")
        t = block.detach().to("cpu").contiguous()
        if t.numel():
            self._written += t.numel() * t.element_size()
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()), done)
        elif done is not None:
            done()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor."""
        if tuple(tensor.shape) != self._shapes.get(name):
            raise RuntimeError(f"tensor {name} has shape {tuple(tensor.shape)}, the plan says {self._shapes.get(name)}")
        self.write_block(name, tensor)

    def close(self) -> dict[str, str]:
        """Finish the last shard, write the index (for several shards); return sha256 by file name."""
        self._finish_tensor()
        if next(self._order, None) is not None:
            raise RuntimeError("not every planned tensor was written")
        self._close_shard()
        if len(self.names) > 1:
            weight_map = {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            data = (json.dumps(index, indent=2) + "\n").encode()
            name = "model.safetensors.index.json"
            (self.folder / name).write_bytes(data)
            self.sha256[name] = hashlib.sha256(data).hexdigest()
        return self.sha256

    def abort(self) -> None:
        self._close_shard()


def largest_tensor_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Bytes of the largest tensor among weight files, from safetensors headers alone (for resource
    requests). A pickle cannot be inspected without reading it, so its file size stands in."""
    largest = 0
    for p in map(Path, paths):
        if not p.is_file():
            continue
        if p.suffix == ".safetensors":
            try:
                f = SafetensorsFile(p)
            except LlamaforgeError:
                continue
            largest = max([largest] + [f.info(k).nbytes for k in f.keys()])
            f.close()
        elif p.suffix in (".bin", ".pth", ".pt"):
            largest = max(largest, p.stat().st_size)
    return largest
