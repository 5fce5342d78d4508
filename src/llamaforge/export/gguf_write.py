"""The GGUF sink: gguf-py's `GGUFWriter` writes the header, the metadata and the tensor infos into
our (hashing) file; the tensor data is written here, block of rows by block of rows, converted to
F16/BF16 or quantized to Q8_0 with `gguf.quants` (bit-exact with llama.cpp), norms and 1-D tensors
in F32; bytes that need no conversion are copied in the kernel.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a tensor is converted: the metadata and the checks need none
    import torch

    from ..formats.stream import HashingWriter


def _convert_block(gguf, qtype, block: torch.Tensor) -> memoryview:
    """One block of rows in the GGML type (row-wise, so blocks concatenate to the whole tensor)."""
    import torch

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return memoryview(block.to(torch.float32).contiguous().numpy()).cast("B")
    if qtype == Q.F16:
        return memoryview(block.to(torch.float16).contiguous().numpy()).cast("B")
    if qtype == Q.BF16:
        return memoryview(block.to(torch.bfloat16).contiguous().view(torch.int16).numpy()).cast("B")
    q = gguf.quants.quantize(block.to(torch.float32).numpy(), qtype)
    return memoryview(q).cast("B")


def begin_gguf_file(gguf, writer, f: HashingWriter, path) -> None:
    """Have gguf-py's `writer` (made with path=None and every KV and tensor info added) write the
    header, the metadata and the tensor infos into our file `f`, padded to the data's alignment.

    gguf-py has no public call for "write everything but the tensor data to this file object":
    this sets its internal state (`fout`, `path`, `state = WriterState.EMPTY`) as `open_output_file`
    would, then calls its own write_*_to_file methods. Checked on gguf 0.19.0; a gguf-py
    that changes these internals fails here loudly (AttributeError), not with a wrong file.
    """
    writer.fout = [f]
    writer.path = path
    writer.state = gguf.gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.write_padding(f, f.tell(), writer.data_alignment)


class Converter:
    """Converts tensors block by block of rows; Q8_0 blocks are quantized in two threads (numpy
    releases the GIL), and written in order."""

    def __init__(self, gguf):
        from concurrent.futures import ThreadPoolExecutor

        self.gguf = gguf
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llamaforge-quant")

    def write(self, f: HashingWriter, qtype, tensor: torch.Tensor, source: tuple[int, int] | None = None,
              code: str | None = None) -> None:
        if type(tensor).__module__ == "numpy":
            return self._write_raw(f, qtype, tensor, source, code)
        import torch

        from ..formats.stream import BLOCK_ELEMS, block_rows

        Q = self.gguf.GGMLQuantizationType
        rows = tensor.shape[0] if tensor.dim() > 1 else 1
        flat = tensor.reshape(rows, -1)
        same = (qtype == Q.F16 and tensor.dtype == torch.float16) or (qtype == Q.F32 and tensor.dtype == torch.float32) \
            or (qtype == Q.BF16 and tensor.dtype == torch.bfloat16)
        if same:  # bytes pass straight through (copied in the kernel when they lie in a file as they are)
            mv = memoryview(flat.view(torch.uint8).numpy()).cast("B")
            if source is not None:
                f.copy_range(mv, *source)
            else:
                f.write(mv)
            return
        width = flat.shape[1]
        # quantizing holds several float32 temporaries per value, in two threads: half-size blocks
        step = block_rows(width, values=BLOCK_ELEMS // 2 if qtype == Q.Q8_0 else BLOCK_ELEMS)
        self._write_blocks(f, qtype, [flat[a:a + step] for a in range(0, rows, step)], _convert_block)

    def _write_blocks(self, f: HashingWriter, qtype, blocks: list, convert) -> None:
        """The blocks converted by `convert(gguf, qtype, block)` and written in order; Q8_0 blocks
        are quantized in two threads (numpy releases the GIL), at most three ahead."""
        if qtype != self.gguf.GGMLQuantizationType.Q8_0 or len(blocks) == 1:
            for b in blocks:
                f.write(convert(self.gguf, qtype, b))
            return
        pending: collections.deque = collections.deque()
        for b in blocks:
            pending.append(self._pool.submit(convert, self.gguf, qtype, b))
            if len(pending) >= 3:
                f.write(pending.popleft().result())
        while pending:
            f.write(pending.popleft().result())

    def _write_raw(self, f: HashingWriter, qtype, tensor, source: tuple[int, int] | None, code: str) -> None:
        """write() for a tensor of the raw stream (numpy, its values as unsigned integers of their
        size, stored as `code`): F16 values pass through or become F32 or Q8_0, exactly as torch
        converts them (float16 -> float32 is exact); other stored types go through torch."""
        import numpy as np

        from ..formats.stream import BLOCK_ELEMS, block_rows

        Q = self.gguf.GGMLQuantizationType
        same = {Q.F16: "F16", Q.F32: "F32", Q.BF16: "BF16"}.get(qtype) == code
        rows = tensor.shape[0] if tensor.ndim > 1 else 1
        flat = tensor.reshape(rows, -1)
        if same:
            mv = memoryview(flat.reshape(-1).view(np.uint8)).cast("B")
            if source is not None:
                f.copy_range(mv, *source)
            else:
                f.write(mv)
            return
        if code != "F16":
            raise ValueError(f"the raw stream converts F16 only, not {code}")
        width = flat.shape[1]
        step = block_rows(width, values=BLOCK_ELEMS // 2 if qtype == Q.Q8_0 else BLOCK_ELEMS)
        self._write_blocks(f, qtype, [flat[a:a + step].view(np.float16) for a in range(0, rows, step)], _convert_raw)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _convert_raw(gguf, qtype, block) -> memoryview:
    """One block of float16 rows (numpy) in the GGML type F32 or Q8_0."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return memoryview(block.astype(np.float32)).cast("B")
    if qtype == Q.Q8_0:
        return memoryview(gguf.quants.quantize(block.astype(np.float32), qtype)).cast("B")
    raise ValueError(f"the raw stream does not convert float16 to {qtype!r}")
