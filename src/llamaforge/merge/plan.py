"""The merge's plan, checked before the first byte is written: for every output tensor where it
starts (the base, or the last adapter's full tensor) and which LoRA updates apply, shapes and the
vocabulary along the adapter list, the tokenizer folder, and adapters already in the base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LlamaforgeError
from ..tokenizer import VOCAB_EXPLAINED
from ..files.hashing import sha256_cached
from ..files.reading import require_dir
from ..formats.dtypes import TensorInfo
from ..formats.source import ModelSource
from ..model import EMBED_HF, LM_HEAD_HF, hf_tensor_order
from ..tokenizer import has_tokenizer
from .lora import Adapter, LoraUpdate

@dataclass
class TensorPlan:
    name: str
    out: TensorInfo
    start: tuple[int, str] | None  # (adapter index, adapter tensor) of the last full replacement, or None
    updates: list[tuple[int, LoraUpdate]] = field(default_factory=list)
    from_name: str = ""  # base tensor to start from when start is None (lm_head of a tied model: embed)

    @property
    def changed(self) -> bool:
        return self.start is not None or bool(self.updates)


def _delta_shape(ad: Adapter, up: LoraUpdate) -> tuple[int, int]:
    a, b = ad.info(up.A).shape, ad.info(up.B).shape
    if up.embedding:
        return (a[1], b[0])
    return (a[1], b[0]) if up.fan_in_fan_out else (b[0], a[1])


def _resolve_tokenizer(tokenizer, adapters: list[Adapter], base: Path) -> Path:
    if tokenizer is not None:
        folder = require_dir(tokenizer, "tokenizer folder")
    else:
        folder = next((ad.folder for ad in reversed(adapters) if has_tokenizer(ad.folder)), base)
    if not has_tokenizer(folder):
        raise LlamaforgeError(
            "no tokenizer in the tokenizer folder (tokenizer.model or tokenizer.json)", folder,
            "pass --tokenizer (tokenizer: in config.yaml) pointing to a folder with tokenizer.model or tokenizer.json, "
            "e.g. tokenizers/NAME or the base model's folder",
        )
    return folder


def unties_head(adapters: list[Adapter]) -> bool:
    """Whether the adapters untie a tied base's head. PEFT gives every module of modules_to_save its
    own trained copy, and a LoRA on lm_head its own update: a trained lm_head is its own tensor, and
    so is the head beside a trained embed_tokens alone, since PEFT's forward keeps the head tied to
    the original (base) embedding, not to the trained copy (peft 0.21; peft#2777). An adapter saved
    with ensure_weight_tying trains one copy for both (it stores lm_head as the same tensor as
    embed_tokens): the model stays tied, as PEFT's forward has it. A LoRA update of embed_tokens alone
    (its base layer saved or not) is added to the embedding lookup only: the head keeps the base's."""
    return any(LM_HEAD_HF in ad.updates
               or ((LM_HEAD_HF in ad.full or EMBED_HF in ad.full or EMBED_HF in ad.updates)
                   and not ad.config.get("ensure_weight_tying"))
               for ad in adapters)


def plan_merge(base: ModelSource, adapters: list[Adapter], dtype: torch.dtype, tied: bool) -> list[TensorPlan]:
    """Decide, for every output tensor, where it starts and which updates apply; check shapes and vocab."""
    names = [n for n in base.keys() if not n.endswith("rotary_emb.inv_freq")]
    if tied and LM_HEAD_HF not in base and unties_head(adapters):
        names.append(LM_HEAD_HF)  # an adapter unties the head: it starts as the base's embedding
    plans = []
    for name in sorted(names, key=hf_tensor_order):
        from_name = EMBED_HF if (name == LM_HEAD_HF and name not in base) else name
        base_info = base.info(from_name)
        if not base_info.dtype.is_floating_point:
            raise LlamaforgeError(
                f"{from_name} is stored as {str(base_info.dtype).removeprefix('torch.')}, not as floating-point "
                "weights", base.folder, "merge into a float16/bfloat16/float32 base (not a quantized or mislabelled one)")
        shape = base_info.shape
        start = None
        updates: list[tuple[int, LoraUpdate]] = []
        for i, ad in enumerate(adapters):
            full = ad.full.get(name)
            if full is not None:
                fshape = ad.info(full).shape
                if len(fshape) != len(shape) or fshape[1:] != shape[1:]:
                    raise LlamaforgeError(
                        f"{full} has shape {list(fshape)} but the model's {name} is {list(shape)}", ad.weights_file,
                        "the adapter was trained for another model size: use the matching base",
                    )
                if name in (EMBED_HF, LM_HEAD_HF):
                    if fshape[0] < shape[0]:
                        raise LlamaforgeError(
                            f"the vocabulary would shrink from {shape[0]} to {fshape[0]} rows of {name} at this adapter",
                            ad.folder,
                            "order the adapters so the vocabulary only grows (e.g. LLaMA-Plus before Alpaca-Plus); "
                            + VOCAB_EXPLAINED,
                        )
                elif fshape != shape:
                    raise LlamaforgeError(f"{full} has shape {list(fshape)} but the model's {name} is {list(shape)}",
                                          ad.weights_file, "use the adapter trained for this base")
                shape = tuple(fshape)
                start = (i, full)
                updates = []  # a full tensor replaces everything before it
            up = ad.updates.get(name)
            if up is not None:
                ds = _delta_shape(ad, up)
                if ds != tuple(shape):
                    hint = (" (the vocabulary at this point has a different size: check the adapter order)"
                            if name in (EMBED_HF, LM_HEAD_HF) else "")
                    raise LlamaforgeError(
                        f"the LoRA update of {name} has shape {list(ds)} but the tensor is {list(shape)}{hint}",
                        ad.weights_file, "use the adapter trained for this base, in the right order",
                    )
                updates.append((i, up))
        src_dtype = ad.info(start[1]).dtype if start else base_info.dtype
        out_dtype = dtype if src_dtype.is_floating_point else src_dtype
        plans.append(TensorPlan(name, TensorInfo(name, out_dtype, tuple(shape)), start, updates, from_name))
    return plans


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _refuse_adapters_already_in(base: Path, loras) -> None:
    """A folder this merge wrote, given again as a base: an adapter whose weights its llamaforge.json
    records among the inputs (by sha256, so a copy or a moved folder counts too) is refused, since
    merging it again would add its update twice. Another tool's folder, or a manifest that is not a
    merge's, says nothing about what is in the weights and is taken as a plain base."""
    import json

    try:
        manifest = json.loads((base / "llamaforge.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(manifest, dict) or manifest.get("llamaforge") != "merge":
        return
    hashes = manifest.get("inputs_sha256")
    merged = {h for k, h in hashes.items() if isinstance(k, str) and Path(k).name in ADAPTER_WEIGHTS} \
        if isinstance(hashes, dict) else set()
    for p in loras:
        for name in ADAPTER_WEIGHTS:
            f = Path(p) / name
            if merged and f.is_file() and sha256_cached(f) in merged:
                raise LlamaforgeError(
                    f"this adapter is already merged into the base {os.fspath(base)} (its llamaforge.json lists "
                    "it among the merge's inputs); merging it again would add its update twice", p,
                    "give the original base model with the whole adapter list, or leave this adapter out")
