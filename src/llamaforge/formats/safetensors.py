"""The safetensors format: a strictly checked reader (`SafetensorsFile`: header, offsets, no
duplicate keys) and the sharded writer (`ShardedSafetensorsWriter`, with its index).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

from typing import TYPE_CHECKING

from ..errors import LlamaforgeError
from .dtypes import ST_ITEMSIZE, TensorInfo, pread_into

if TYPE_CHECKING:  # torch only where a tensor is made: a header or raw bytes need none
    import torch
from .stream import HashingWriter


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

    def _pread(self, buf, offset: int, name: str) -> None:
        """Fill the uint8 buffer `buf` from `offset` of the data section (positional: thread-safe)."""
        pread_into(self._f.fileno(), buf, self._base + offset, self.path, name)

    def get(self, name: str) -> torch.Tensor:
        import torch

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
        import torch

        info, start, _ = self._entries[name]
        item = info.itemsize
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

    def read_flat(self, name: str, first: int, count: int, buf):
        """Elements [first, first+count) of `name`, flattened, read into the uint8 buffer `buf`: a
        torch tensor gives a tensor of the stored dtype, a numpy array its raw bytes (no torch)."""
        info, start, _ = self._entries[name]
        item = info.itemsize
        view = buf[: count * item]
        self._pread(view, start + first * item, name)
        return view if type(view).__module__ == "numpy" else view.view(info.dtype)

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
        if code not in ST_ITEMSIZE:
            known = ", ".join(ST_ITEMSIZE)
            raise LlamaforgeError(f"tensor {name} has dtype {code!r}, which llamaforge cannot read (it reads {known})",
                                  path, "convert the weights to F16, BF16 or F32 (e.g. with transformers) first")
        if not isinstance(shape, list) or not all(_int(d) for d in shape):
            raise LlamaforgeError(f"tensor {name} has the shape {shape!r}, not a list of integers", path, fix)
        if any(d < 0 for d in shape):
            raise LlamaforgeError(f"tensor {name} has a negative dimension in its shape {shape}", path, fix)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(x) for x in offsets)):
            raise LlamaforgeError(f"tensor {name} has data_offsets {offsets!r}, not two integers", path, fix)
        start, end = offsets
        info = TensorInfo(name, code, tuple(shape))
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
        header[t.name] = {"dtype": t.code, "shape": list(t.shape),
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
        import torch

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
