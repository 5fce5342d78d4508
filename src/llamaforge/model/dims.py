"""A model's hyper-parameters (`LlamaDims`) and rope settings from its config.json, checked: a
garbled count is one clear error, never a division by zero or a NaN written into an output."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlamaforgeError
from .families import family_of
from .tensors import TensorName


@dataclass(frozen=True)
class LlamaDims:
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    norm_eps: float
    rope_theta: float = 10000.0
    max_positions: int = 2048
    head_dim: int = 0  # 0 = hidden // n_heads
    tied: bool = False
    family: str = "llama"  # a key of FAMILIES

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.n_heads

    def heads_of(self, t: TensorName) -> int | None:
        return self.n_heads if t.permute == "q" else self.n_kv_heads if t.permute == "k" else None

    def shape_of(self, t: TensorName) -> tuple[int, ...]:
        """The full (unsplit) shape of a tensor, as Hugging Face, Meta and GGUF all store it (out, in)."""
        h, hd = self.hidden, self.hd
        return {
            "embed": (self.vocab, h), "norm": (h,), "output": (self.vocab, h),
            "q": (self.n_heads * hd, h), "k": (self.n_kv_heads * hd, h), "v": (self.n_kv_heads * hd, h),
            "o": (h, self.n_heads * hd), "gate": (self.intermediate, h), "up": (self.intermediate, h),
            "down": (h, self.intermediate), "attn_norm": (h,), "ffn_norm": (h,),
            "q_bias": (self.n_heads * hd,), "k_bias": (self.n_kv_heads * hd,), "v_bias": (self.n_kv_heads * hd,),
            "q_norm": (hd,), "k_norm": (hd,), "qkv": ((self.n_heads + 2 * self.n_kv_heads) * hd, h),
            "gate_up": (2 * self.intermediate, h), "post_attn_norm": (h,), "post_ffn_norm": (h,),
        }[t.role]


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _number(v, key: str) -> float:
    """A JSON number as a float; a string, a boolean, null or anything else is a TypeError naming the key."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{key!r} (a JSON {type(v).__name__} {json.dumps(v)[:40]}, not a number)")
    return float(v)


def _whole(cfg: dict, key: str, default=None) -> int:
    """A config.json count: a JSON whole number (never a string such as "64", a boolean or a fraction)."""
    v = cfg.get(key) if default is None else _get(cfg, key, default=default)
    if v is None and default is None:
        raise KeyError(key)
    f = _number(v, key)
    if not f.is_integer():
        raise ValueError(f"{key!r} ({v}, not a whole number)")
    return int(f)


def rope_settings(cfg: dict) -> tuple[float, str, dict, float | None]:
    """(rope_theta, rope_type, parameters, sliding-window layers' rope_theta or None) from a config.json
    of transformers 4 (rope_theta, rope_scaling, rope_local_base_freq) or 5 (rope_parameters). Rope
    parameters per layer type (Gemma-3's "full_attention" / "sliding_attention"): the full-attention
    layers' are the model's, as llama.cpp's converter takes them (its rope base; the sliding layers'
    base is the fourth value)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise TypeError("'rope_parameters' / 'rope_scaling' (not an object)")
    swa = cfg.get("rope_local_base_freq")
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention") or {}
        params = params.get("full_attention") or {}
        if not isinstance(params, dict) or not isinstance(local, dict):
            raise TypeError("'rope_parameters' (a layer type's parameters are not an object)")
        swa = local.get("rope_theta", swa)
    swa = None if swa is None else _number(swa, "rope_local_base_freq")
    for where, key in ((params, "rope_theta"), (cfg, "rope_theta")):
        if key in where and where[key] is None and _get(params, key) is None:
            raise TypeError("'rope_theta' (null, not a number)")
    theta = _number(_get(params, "rope_theta", default=_get(cfg, "rope_theta", default=10000.0)), "rope_theta")
    rtype = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, rtype, {**scaling, **params}, swa


MAX_LAYERS = 10_000  # far beyond any model; a larger count is a garbled file, not a model


def check_dims(dims: LlamaDims, path, fix: str) -> LlamaDims:
    """Every dimension a positive integer (head counts that divide), eps and theta positive finite
    numbers: a garbled config.json or params.json is one clear error, never a division by zero, a
    NaN written into an output or a loop over 10**12 layers."""
    for name, v in (("hidden size", dims.hidden), ("intermediate size", dims.intermediate),
                    ("layer count", dims.n_layers), ("attention heads", dims.n_heads),
                    ("key/value heads", dims.n_kv_heads), ("vocabulary size", dims.vocab),
                    ("context length", dims.max_positions)):
        if v < 1:
            raise LlamaforgeError(f"the {name} is {v}; it must be a positive number", path, fix)
    if dims.n_layers > MAX_LAYERS:
        raise LlamaforgeError(f"the layer count is {dims.n_layers}, more than any model has", path, fix)
    if dims.head_dim < 0:
        raise LlamaforgeError(f"head_dim is {dims.head_dim}", path, fix)
    if dims.n_heads % dims.n_kv_heads:
        raise LlamaforgeError(f"num_attention_heads {dims.n_heads} is not a multiple of num_key_value_heads "
                              f"{dims.n_kv_heads}", path, fix)
    for name, v in (("norm epsilon", dims.norm_eps), ("rope theta", dims.rope_theta)):
        if not (math.isfinite(v) and v > 0):
            raise LlamaforgeError(f"the {name} is {v}; it must be a positive finite number", path, fix)
    if dims.hd < 1:
        raise LlamaforgeError(f"the head size is {dims.hd}", path, fix)
    return dims


def dims_from_config(cfg: dict, path: str | Path) -> LlamaDims:
    """LlamaDims from a Hugging Face config.json, with a clear error for what is not LLaMA."""
    fam = family_of(cfg, path)
    try:
        hidden = _whole(cfg, "hidden_size")
        n_heads = _whole(cfg, "num_attention_heads")
        dims = LlamaDims(
            hidden=hidden, intermediate=_whole(cfg, "intermediate_size"), n_layers=_whole(cfg, "num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=_whole(cfg, "num_key_value_heads", default=n_heads),
            vocab=_whole(cfg, "vocab_size"), norm_eps=_number(_get(cfg, "rms_norm_eps", default=1e-6), "rms_norm_eps"),
            rope_theta=rope_settings(cfg)[0], max_positions=_whole(cfg, "max_position_embeddings", default=2048),
            head_dim=_whole(cfg, "head_dim", default=0), tied=bool(cfg.get("tie_word_embeddings", False)),
            family=fam.name,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise LlamaforgeError(f"config.json lacks or garbles {e}", path,
                              "use the config.json written with the model (LlamaConfig)") from None
    check_dims(dims, path, "use the config.json written with the model (LlamaConfig)")
    if not fam.qkv_bias and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise LlamaforgeError(f"the {fam.architecture} has attention or MLP biases, which its Meta and GGUF "
                              "layouts do not hold", path, "export a model of this family without biases")
    if dims.n_heads % dims.n_kv_heads:
        raise LlamaforgeError(f"num_attention_heads {dims.n_heads} is not a multiple of num_key_value_heads "
                              f"{dims.n_kv_heads}", path, "fix config.json")
    if dims.hd % 2:
        raise LlamaforgeError(f"head dimension {dims.hd} is odd: rotary embeddings need an even one", path,
                              "fix config.json")
    return dims

