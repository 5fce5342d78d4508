"""`ModelSource`: every tensor of a Hugging Face model folder, single-file or sharded, safetensors
or .bin, its directory read when made, so names, dtypes and shapes are known before any data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..errors import LlamaforgeError
from .dtypes import TensorInfo
from .safetensors import SafetensorsFile

if TYPE_CHECKING:  # torch with a pickle (.bin) only: safetensors headers and bytes need none
    import torch


def open_weights_file(path: str | os.PathLike):
    p = Path(path)
    if p.suffix == ".safetensors":
        return SafetensorsFile(p)
    from .pickles import TorchFile

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

    def read_flat(self, name: str, first: int, count: int, buf):
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
            if not isinstance(self._open[f], SafetensorsFile) and all(
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
