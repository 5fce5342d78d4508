"""The Meta `.pth` sink: `torch.save`'s own zip format, written one storage record at a time.

`data.pkl` is pickled up front from the planned names, dtypes and shapes exactly as torch.save
pickles a dict of tensors, then the records follow in the order torch.save writes them (with
`torch._C.PyTorchFileWriter`, what torch.save uses), so the file is byte-identical to
`torch.save(state_dict, f)` and `torch.load(weights_only=True, mmap=True)` and Meta's code read it.
A record must be written whole: this sink takes whole tensors (or their shard slices).
"""

from __future__ import annotations

import collections
import io
import pickle
import sys

import torch

from .dtypes import TensorInfo

_STORAGE_TYPES = {torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage",
                  torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
                  torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage"}
_STORAGE = "storage"  # interned constants: pickled once and memoized, as in torch.save
_CPU = "cpu"


class _StorageRef:
    __slots__ = ("key", "type", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.type, self.numel = key, getattr(torch, _STORAGE_TYPES[dtype]), numel


class _TensorRef:
    """Pickles exactly as a contiguous CPU tensor does (Tensor._reduce_ex_internal)."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(int(s) for s in shape)

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return (_STORAGE, obj.type, obj.key, _CPU, obj.numel)
        return None


def state_dict_pickle(infos: list[TensorInfo]) -> bytes:
    """torch.save's data.pkl for a dict name -> contiguous tensor, from names, dtypes and shapes alone.
    Storage keys are '0', '1', ... in dict order, as torch.save numbers them."""
    obj = {}
    for i, t in enumerate(infos):
        obj[t.name] = _TensorRef(_StorageRef(str(i), t.dtype, t.numel), t.shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)  # torch.serialization.DEFAULT_PROTOCOL
    return buf.getvalue()


class TorchZipWriter:
    """Write a torch.save-format state dict, one tensor's storage at a time, in plan order."""

    def __init__(self, fileobj, infos: list[TensorInfo]):
        self.infos = infos
        try:
            crc = torch.serialization.get_crc32_options()
            align = torch.serialization._get_storage_alignment()
        except AttributeError:  # older torch: the defaults of torch.save
            crc, align = True, 64
        self._file = fileobj
        self._w = torch._C.PyTorchFileWriter(fileobj, crc, align)
        # The records in torch.serialization._save's order.
        pkl = state_dict_pickle(infos)
        self._w.write_record("data.pkl", pkl, len(pkl))
        self._w.write_record(".format_version", "1", 1)
        a = str(align)
        self._w.write_record(".storage_alignment", a, len(a))
        self._w.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor, source: tuple[int, int] | None = None) -> None:
        """Write the next planned tensor (contiguous). `source` = (fd, offset) where the same bytes lie
        in another file: the record's data is then copied from there in the kernel (the file object
        must offer expect_copy, as stream.HashingWriter does)."""
        info = self.infos[self._next]
        if name != info.name or tuple(tensor.shape) != tuple(info.shape) or tensor.dtype != info.dtype:
            raise RuntimeError(f"{name} {tuple(tensor.shape)} {tensor.dtype} written where the plan has {info}")
        if not tensor.is_contiguous():
            raise RuntimeError(f"{name}: not a contiguous tensor")
        expect = getattr(self._file, "expect_copy", None) if source is not None else None
        if expect is not None:
            expect((info.nbytes, *source))
        try:
            start = tensor.storage_offset() * tensor.element_size()  # a view of the tensor's bytes, no copy
            self._w.write_record(f"data/{self._next}", tensor.untyped_storage()[start: start + info.nbytes],
                                 info.nbytes)
        finally:
            if expect is not None:
                expect(None)  # disarm, whether or not the data came in one piece
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.infos):
            raise RuntimeError(f"wrote {self._next} of {len(self.infos)} planned tensors")
        self._w.write_end_of_file()


