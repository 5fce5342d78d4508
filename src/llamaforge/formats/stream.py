"""The one streaming engine: every merge, export and import is source -> transforms -> sink.

A consumer describes its tensors as *reads*: for each block of rows, in output order, how many
bytes it needs and a `fill(buf)` that puts the block (read from the source, and transformed where
the transform is cheap and row-local: q/k permutation, Meta column gather) into a buffer. A
`BlockReader` runs the reads in a thread of its own, into a small pool of reusable buffers, and
hands the blocks to the consumer in order; the consumer transforms them further (the LoRA
arithmetic) and gives them to a sink: `HashingWriter` under every output file hashes the bytes
while they are written, so no output is ever read twice.

Memory is bounded by the pool (a few blocks, or a few whole tensors for a sink that needs whole
tensors), never by a shard or the model. One rule sizes every block: `block_rows`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import torch

# Values per block of rows, for every stream (merge, exports, import): 8 MB once in float32,
# where the merge does its arithmetic and the GGUF export its conversions.
BLOCK_ELEMS = 2 << 20
# Blocks that are only copied or permuted in their stored (16-bit) dtype, never widened: 16 MB.
COPY_BLOCK_ELEMS = 4 * BLOCK_ELEMS


def block_rows(width: int, unit: int = 1, values: int = BLOCK_ELEMS) -> int:
    """Rows of `width` values per block: as many whole `unit`s of rows as fit in `values` (BLOCK_ELEMS;
    less where a step holds several float32 copies of its block), at least one unit (`unit` =
    head_dim where rows are permuted per head: a block holds whole heads)."""
    return max(unit, values // max(1, width) // unit * unit)


def row_ranges(rows: int, step: int) -> list[tuple[int, int]]:
    """[(r0, r1), ...] covering `rows` rows in steps of `step`; one empty block for an empty tensor
    (it still goes through the stream, so a sink writes its header entry in order)."""
    return [(a, min(rows, a + step)) for a in range(0, rows, max(1, step))] or [(0, 0)]


Fill = Callable[..., object]  # (buf) -> the block, or (block, release)


@dataclass
class Read:
    """One block to read: `key` tells the consumer what it is; `fill(buf)` writes the block into the
    uint8 buffer `buf` (at least `nbytes` long) and returns the block's tensor, or (tensor, release)
    when the tensor is not in `buf` (a view of the page cache, released once the block is used)."""

    key: object
    nbytes: int
    fill: Fill


def torch_bytes(n: int):
    """A uint8 torch buffer of n bytes (the stream's default)."""
    import torch

    return torch.empty(n, dtype=torch.uint8)


def numpy_bytes(n: int):
    """A uint8 numpy buffer of n bytes: for streams that only copy and permute bytes."""
    import numpy as np

    return np.empty(n, dtype=np.uint8)


@dataclass
class Block:
    key: object
    data: torch.Tensor
    buf: torch.Tensor | None  # the pooled buffer this block holds (behind `data`, unless released)
    release: Callable[[], None] | None  # what frees `data` when it is not in a pooled buffer


class BlockReader:
    """Run `reads` in a reader thread, `depth` blocks ahead, each into one of `depth` reusable
    buffers of `buf_bytes`; iterate the blocks in order.

    Give each block back with `done(block)` once its data is no longer needed (from any thread:
    the block may travel on to a writer thread); with `recycle=True` each block is given back
    when the next one is asked for. An error in the reader is raised in the consuming thread;
    leaving the loop early (an error, a break) stops the reader.
    """

    def __init__(self, reads: Iterable[Read], buf_bytes: int, depth: int = 3, recycle: bool = False,
                 name: str = "llamaforge-reader", alloc: Callable[[int], object] | None = None):
        self._reads = reads
        self._recycle = recycle
        self._alloc = alloc or torch_bytes  # numpy_bytes where no tensor is needed (no torch)
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):
            self._free.put(self._alloc(buf_bytes))
        self._out: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            for r in self._reads:
                buf = self._free.get()  # a token: at most `depth` blocks are in flight
                if self._stop.is_set():
                    return
                # the pooled buffer goes with the block, also when the data lies elsewhere (a view of
                # the page cache, or a buffer of its own for a row wider than a block): it is the
                # token that bounds the blocks in flight
                got = r.fill(buf if buf.shape[0] >= r.nbytes else self._alloc(r.nbytes))
                data, release = got if isinstance(got, tuple) else (got, None)
                self._out.put(Block(r.key, data, buf, release))
            self._out.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            self._out.put(e)

    def done(self, block: Block) -> None:
        """The block's data is used: its pages or its buffer can go."""
        if block.release is not None:
            block.release()
            block.release = None
        if block.buf is not None:
            self._free.put(block.buf)
            block.buf = None

    def __iter__(self) -> Iterator[Block]:
        self._thread.start()
        prev = None
        try:
            while True:
                item = self._out.get()
                if prev is not None:
                    self.done(prev)
                    prev = None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if self._recycle:
                    prev = item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader wherever it waits (the one teardown of every stream)."""
        self._stop.set()
        while self._thread.is_alive():
            self._free.put(self._alloc(0))
            try:
                self._out.get(timeout=0.05)
            except queue.Empty:
                pass


class Stage:
    """A thread that runs submitted calls in order (a sink's writes beside the arithmetic).

    `submit(fn, cleanup)` queues fn. A call that raises, and every call after it (they are
    skipped), has its `cleanup` run instead, so buffers go back; a call that succeeds owns the
    release of what it was given. `close()` waits and raises the first failure.
    """

    def __init__(self, name: str, depth: int = 3):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, cleanup = item
            try:
                if self.failure is None:
                    fn()
                    continue
            except BaseException as e:  # noqa: BLE001 - raised by close()
                self.failure = e
            if cleanup is not None:
                cleanup()

    def submit(self, fn: Callable[[], None], cleanup: Callable[[], None] | None = None) -> None:
        self._q.put((fn, cleanup))

    def close(self, raise_failure: bool = True) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if raise_failure and self.failure is not None:
            raise self.failure


class HashingWriter:
    """Wraps a binary file opened for writing; computes its sha256 on the way (no second read).

    Large writes are hashed in a helper thread while the same bytes go to the file (both release
    the GIL). `copy_range` writes bytes that also lie unchanged in another file with
    `os.copy_file_range` (an in-kernel copy, as `cp` does) while hashing the in-memory copy.
    `expect_copy((n, fd, offset))` arms it for the next write of exactly n bytes (the data record
    that torch's zip writer hands to `write`); `expect_copy(None)` disarms it.
    """

    _PARALLEL = 1 << 20  # smaller writes are hashed and written in this thread, never copied in the kernel

    def __init__(self, f):
        self._f = f
        self._h = hashlib.sha256()
        self._pos = 0
        self._pool = None
        self._expect: tuple[int, int, int] | None = None

    def _hash_async(self, mv):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaforge-sha256")
        return self._pool.submit(self._h.update, mv)

    def expect_copy(self, expect: tuple[int, int, int] | None) -> None:
        self._expect = expect

    def write(self, data, done: Callable[[], None] | None = None) -> int:
        """Write `data` and hash it. With `done`, return as soon as the bytes are written: the hash
        follows in the helper thread (in order), and `done()` is called once `data` is no longer
        needed; if the write fails, `done` is not called (the caller still owns `data`)."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if self._expect is not None and self._expect[0] == n:
            _, fd, offset = self._expect
            self._expect = None
            return self.copy_range(mv, fd, offset)
        if n >= self._PARALLEL or done is not None:
            hashed = self._hash_async(mv)
            try:
                self._f.write(mv)
            except BaseException:
                hashed.result()
                raise
            if done is None:
                hashed.result()
            else:
                hashed.add_done_callback(lambda _: done())
        else:
            self._h.update(mv)
            self._f.write(mv)
        self._pos += n
        return n

    def copy_range(self, mv, fd: int, offset: int) -> int:
        """Append len(mv) bytes copied from `fd` at `offset`; `mv` must hold the same bytes (hashed).
        Small runs, and file systems without copy_file_range, are written from `mv` instead."""
        mv = memoryview(mv).cast("B")
        n = len(mv)
        if n < self._PARALLEL:
            return self.write(mv)
        self._f.flush()
        out = self._f.fileno()
        done = self._hash_async(mv)
        try:
            copied = 0
            try:
                while copied < n:
                    k = os.copy_file_range(fd, out, n - copied, offset + copied)
                    if k <= 0:
                        raise OSError("copy_file_range stopped early")
                    copied += k
            except (OSError, AttributeError):  # another file system, or no copy_file_range: plain write
                if copied:
                    os.lseek(out, -copied, os.SEEK_CUR)
                self._f.write(mv)
        finally:
            done.result()
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:  # the wrapped file is closed by its owner
        self._f.flush()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def hexdigest(self) -> str:
        return self._h.hexdigest()
