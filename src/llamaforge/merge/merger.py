"""The streaming merge itself: tensors flow through in blocks of rows; only a few blocks, the current
tensor's adapter factors and a float32 scratch block are in memory at any time, and reading,
arithmetic, writing and hashing overlap in their own threads.
"""

from __future__ import annotations

import functools
import queue

import torch

from ..errors import LlamaforgeError
from ..formats.safetensors import SafetensorsFile, ShardedSafetensorsWriter
from ..formats.source import ModelSource
from ..formats.stream import BLOCK_ELEMS, BlockReader, Read, Stage, block_rows, row_ranges
from .lora import Adapter, Factors, apply_factors, load_factors
from .plan import TensorPlan

_FP16_MAX = 65504.0


def _view_block(f: SafetensorsFile, name: str, first: int, count: int, buf: torch.Tensor):
    return f.view_flat(name, first, count)  # (view, release): the pooled buffer is not needed


def _read_block(src, name: str, first: int, count: int, buf: torch.Tensor) -> torch.Tensor:
    return src.read_flat(name, first, count, buf)


class _Merger:
    """The merge as a consumer of the stream (llamaforge.formats.stream): the reader thread reads blocks of
    rows of each tensor's source (views of the page cache for safetensors), the calling thread
    applies the LoRA factors in float32 (llamaforge.merge.lora) and casts back, a writer stage writes and
    hashes. Torch runs single-threaded here: the three stages are the parallelism.
    """

    def __init__(self, base: ModelSource, adapters: list[Adapter], device: str):
        self.base, self.adapters, self.device = base, adapters, device

    def _source(self, p: TensorPlan):
        if p.start is not None:
            i, tname = p.start
            return self.adapters[i].source, tname
        return self.base, p.from_name

    @staticmethod
    def _rows(p: TensorPlan) -> tuple[int, int]:
        shape = p.out.shape
        if len(shape) >= 2:
            return shape[0], p.out.numel // max(1, shape[0])
        return p.out.numel, 1

    def _reads(self, plans: list[TensorPlan]):
        """The blocks of every tensor, in plan order (runs in the reader thread)."""
        done: list[str] = []
        for p in plans:
            src, tname = self._source(p)
            rows, width = self._rows(p)
            f = src.file_of(tname) if isinstance(src, ModelSource) else src
            item = src.info(tname).dtype.itemsize
            for r0, r1 in row_ranges(rows, block_rows(width)):
                first, count = r0 * width, (r1 - r0) * width
                if isinstance(f, SafetensorsFile):  # no copy: a view of the page cache
                    fill = functools.partial(_view_block, f, tname, first, count)
                else:
                    fill = functools.partial(_read_block, src, tname, first, count)
                yield Read((p, r0, r1), count * item, fill)
            if p.start is None:
                done.append(p.from_name)
                self.base.release(done)  # a pickled base's file closes once all its tensors are read

    def _factors(self, p: TensorPlan) -> list[Factors]:
        return [load_factors(self.adapters[i], up, self.device) for i, up in p.updates]

    def _check(self, p: TensorPlan, x: torch.Tensor) -> None:
        """NaN/Inf in a float32 block, or values the output dtype cannot hold."""
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        limit = _FP16_MAX if p.out.dtype == torch.float16 else float("inf")
        if not (-limit <= lo and hi <= limit):  # also false for NaN
            self._nonfinite(p)

    def _nonfinite(self, p: TensorPlan) -> None:
        where = self.adapters[p.updates[-1][0]].weights_file if p.updates else (
            self.adapters[p.start[0]].weights_file if p.start else self.base.folder)
        raise LlamaforgeError(
            f"merging produced NaN or Inf in {p.name} ({p.out.dtype})", where,
            "the adapter holds NaN/Inf or values too large for the dtype: check the adapter, or merge with "
            "--dtype float32/bfloat16",
        )

    def run(self, plans: list[TensorPlan], writer: ShardedSafetensorsWriter, progress=None) -> None:
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        nbuf = 3
        out_free: queue.Queue = queue.Queue()
        for _ in range(nbuf):
            out_free.put(torch.empty(BLOCK_ELEMS * 4, dtype=torch.uint8))
        scratch = torch.empty(BLOCK_ELEMS, dtype=torch.float32, device=self.device)
        reader = BlockReader(self._reads(plans), BLOCK_ELEMS * 4, depth=nbuf)
        stage = Stage("llamaforge-writer", depth=nbuf)

        def write(name, data, done):
            if progress is not None:
                progress.update(data.numel() * data.element_size())
            writer.write_block(name, data, done)  # hashed behind the write; done() frees the buffer

        try:
            current, factors, width = None, [], 1
            for blk in reader:
                if stage.failure is not None:
                    reader.done(blk)
                    break
                p, r0, r1 = blk.key
                if p is not current:
                    current, factors, (_, width) = p, self._factors(p), self._rows(p)
                    if progress is not None:
                        progress.set_postfix_str(p.name, refresh=False)
                view = blk.data
                n = view.numel()
                same = view.dtype == p.out.dtype
                if not factors and same and not p.changed:  # untouched: bytes pass straight through
                    release = functools.partial(reader.done, blk)
                    stage.submit(functools.partial(write, p.name, view, release), release)
                    continue
                x = scratch[:n] if n <= scratch.numel() else torch.empty(n, dtype=torch.float32, device=self.device)
                x.copy_(view)
                reader.done(blk)
                if factors:
                    apply_factors(x.view(r1 - r0, width), r0, factors)
                if p.changed or not same:
                    self._check(p, x)
                obuf = out_free.get()
                size = n * p.out.dtype.itemsize
                if obuf.numel() < size:
                    obuf = torch.empty(size, dtype=torch.uint8)
                out = obuf[:size].view(p.out.dtype)
                out.copy_(x)
                release = functools.partial(out_free.put, obuf)
                stage.submit(functools.partial(write, p.name, out, release), release)
                del view, x, out
        finally:
            reader.close()
            stage.close(raise_failure=False)
            torch.set_num_threads(prev_threads)
        if stage.failure is not None:
            raise stage.failure
