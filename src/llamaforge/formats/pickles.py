"""PyTorch pickles (.bin, .pth) read without running code: `torch.load(weights_only=True)`,
memory-mapped, with one-line errors for what it refuses.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from ..errors import LlamaforgeError
from .dtypes import TensorInfo


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

    def read_flat(self, name: str, first: int, count: int, buf):
        """Elements [first, first+count) of `name` into the uint8 buffer `buf`: a torch tensor gives
        a tensor of the stored dtype, a numpy array its raw bytes (as SafetensorsFile.read_flat)."""
        t = self._sd[name]
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        raw = buf[: count * t.element_size()]
        numpy = type(raw).__module__ == "numpy"
        view = (torch.from_numpy(raw) if numpy else raw).view(t.dtype)
        view.copy_(flat[first: first + count])
        return raw if numpy else view

    def close(self) -> None:
        self._sd = {}
