"""The rope of a GGUF beyond its base: what llama.cpp's converter writes for rope scaling that is not
a key/value pair of TextModel's — Llama-3's `rope_freqs.weight` (LlamaModel) and Phi-3's longrope
keys and `rope_factors_long/short` tensors (Phi3MiniModel), chosen by the family entry
(`Family.llama_gguf_rules`, `Family.rope_keys`). Tensors computed here are written first in the
file, as the converter writes its generate_extra_tensors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import LlamaforgeError

if TYPE_CHECKING:
    import torch

    from ..model import ModelFolder


def llama3_rope_factors(hd: int, params: dict) -> torch.Tensor:
    """rope_freqs.weight for llama3 rope scaling, as convert_hf_to_gguf.py's LlamaModel computes it
    (float32, one factor per rotary frequency)."""
    import torch

    base = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _has_rope_freqs(model: ModelFolder) -> bool:
    return model.family.llama_gguf_rules and str(model.rope.type).lower() == "llama3"


def extra_tensors(model: ModelFolder) -> list[tuple[str, torch.Tensor]]:
    """Tensors the GGUF holds that the Hugging Face folder does not (written first, as the converter
    writes its generate_extra_tensors): rope_freqs for llama3 rope scaling (llama.cpp's LlamaModel),
    rope_factors_long/short for longrope (Phi3MiniModel)."""
    if _has_rope_freqs(model):
        params = {"rope_theta": model.dims.rope_theta, **model.rope.parameters}
        return [("rope_freqs.weight", llama3_rope_factors(model.dims.hd, params))]
    factors = _longrope_factors(model)
    if not factors:
        return []
    import torch

    return [(name, torch.tensor(values, dtype=torch.float32)) for name, values in factors]


def extra_tensor_shapes(model: ModelFolder) -> dict[str, tuple[int, ...]]:
    """The names and shapes of extra_tensors, without computing them."""
    if _has_rope_freqs(model):
        return {"rope_freqs.weight": (model.dims.hd // 2,)}
    return {name: (len(values),) for name, values in _longrope_factors(model)}


def _phi3_rope_dims(model: ModelFolder) -> int:
    d = model.dims
    # transformers 5 keeps it in rope_parameters; config.json files saved before (Phi-4-mini's) at the top
    factor = model.rope.parameters.get("partial_rotary_factor", model.config.get("partial_rotary_factor", 1.0))
    return int(float(factor) * d.hidden) // d.n_heads


def _longrope_factors(model: ModelFolder) -> list[tuple[str, list]]:
    """rope_factors_long/short of a longrope model under Phi3MiniModel's rules, checked as it checks them."""
    rp = model.rope.parameters
    if model.family.rope_keys != "phi3" or not rp.get("long_factor"):
        return []
    long, short = rp.get("long_factor"), rp.get("short_factor")
    half = _phi3_rope_dims(model) / 2
    if not isinstance(short, list) or not isinstance(long, list) or len(long) != len(short) or len(long) != half:
        raise LlamaforgeError(f"rope long_factor/short_factor must be two lists of {half:g} numbers (rotary "
                              "dimensions / 2)", model.config_path, "restore the config.json written with the model")
    return [("rope_factors_long.weight", long), ("rope_factors_short.weight", short)]


def phi3_rope_keys(writer, model: ModelFolder) -> None:
    """Phi3MiniModel.set_gguf_parameters' rope keys: dimension count, original context length, and for
    longrope the attention factor (llama.cpp reads the factors from rope_factors_long/short)."""
    rtype, rp, d = str(model.rope.type).lower(), model.rope.parameters, model.dims
    orig = rp.get("original_max_position_embeddings", model.config.get("original_max_position_embeddings"))
    if orig is None:
        raise LlamaforgeError("config.json has no original_max_position_embeddings", model.config_path,
                              "restore the config.json written with the model (Phi3Config)")
    writer.add_rope_scaling_orig_ctx_len(int(orig))
    writer.add_rope_dimension_count(_phi3_rope_dims(model))
    if rp.get("long_factor"):
        scale = d.max_positions / int(orig)
        if rtype in ("su", "longrope"):
            factor = math.sqrt(1 + math.log(scale) / math.log(int(orig))) if scale > 1.0 else 1.0
        elif rtype == "yarn":
            factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise LlamaforgeError(f"rope scaling {rtype!r} with long/short factors is not supported", model.config_path,
                                  "export with llama.cpp's convert_hf_to_gguf.py")
        writer.add_rope_scaling_attn_factors(factor)
    elif rtype not in ("default", "none", "longrope", "su"):
        raise LlamaforgeError(f"rope scaling {rtype!r} is not supported by this exporter", model.config_path,
                              "export with llama.cpp's convert_hf_to_gguf.py")
