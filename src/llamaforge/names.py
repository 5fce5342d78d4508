"""The one table of LLaMA tensor names and layouts: Hugging Face <-> Meta (.pth) <-> GGUF.

Every export and the Meta import read their names, q/k permutations, shard split dimensions and
hyper-parameters from here, so a reader sees every format at once (docs/ARCHITECTURE.md):

    Hugging Face                                   Meta consolidated.NN.pth        GGUF (llama.cpp)        split  q/k
    model.embed_tokens.weight                      tok_embeddings.weight           token_embd.weight       1
    model.norm.weight                              norm.weight                     output_norm.weight      copy
    lm_head.weight                                 output.weight                   output.weight           0
    model.layers.{i}.self_attn.q_proj.weight       layers.{i}.attention.wq.weight  blk.{i}.attn_q.weight   0      q
    model.layers.{i}.self_attn.k_proj.weight       layers.{i}.attention.wk.weight  blk.{i}.attn_k.weight   0      k
    model.layers.{i}.self_attn.v_proj.weight       layers.{i}.attention.wv.weight  blk.{i}.attn_v.weight   0
    model.layers.{i}.self_attn.o_proj.weight       layers.{i}.attention.wo.weight  blk.{i}.attn_output...  1
    model.layers.{i}.mlp.gate_proj.weight          layers.{i}.feed_forward.w1...   blk.{i}.ffn_gate.weight 0
    model.layers.{i}.mlp.down_proj.weight          layers.{i}.feed_forward.w2...   blk.{i}.ffn_down.weight 1
    model.layers.{i}.mlp.up_proj.weight            layers.{i}.feed_forward.w3...   blk.{i}.ffn_up.weight   0
    model.layers.{i}.input_layernorm.weight        layers.{i}.attention_norm...    blk.{i}.attn_norm...    copy
    model.layers.{i}.post_attention_layernorm...    layers.{i}.ffn_norm.weight      blk.{i}.ffn_norm.weight copy

Rotary `inv_freq` buffers (HF) and `rope.freqs` (LLaMA-1 .pth) are derived, never stored.

**q/k order.** Hugging Face's conversion permutes the rows of wq and wk per head so that its
rotary embedding can rotate halves; Meta and GGUF keep the interleaved order. HF -> Meta/GGUF is
`w.view(heads, 2, head_dim // 2, in).transpose(1, 2)` (llama.cpp's `LlamaModel.permute` in
convert_hf_to_gguf.py); Meta -> HF is the inverse `w.view(heads, head_dim // 2, 2, in).transpose(1, 2)`
(transformers' convert_llama_weights_to_hf.py). `heads` is n_kv_heads for wk (grouped-query attention).

**Meta shards.** Model-parallel checkpoints split each tensor across N files: column-parallel
layers (wq, wk, wv, w1, w3, output) on dim 0, row-parallel ones (wo, w2) on dim 1, the parallel
embedding on dim 1; norms are copied into every shard. A dimension must divide by N, except the
vocabulary of `output` (e.g. 49953): the first N-1 shards take `vocab // N` rows each and the last
shard the remainder. Meta's counts: hidden 4096 -> 1, 5120 -> 2, 6656 -> 4, 8192 -> 8.

**params.json.** `dim, multiple_of, n_heads, [n_kv_heads], n_layers, norm_eps, vocab_size,
[ffn_dim_multiplier], [rope_theta]`. Meta derives the FFN width as in its `FeedForward`:
`hidden = int(2 * 4 * dim / 3); hidden = int(ffn_dim_multiplier * hidden); hidden = multiple_of *
ceil(hidden / multiple_of)`, 11008 for dim 4096. `ffn_params()` picks `multiple_of` (and a multiplier
when needed) that reproduce a model's intermediate_size exactly, or says it is impossible.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LlamaforgeError

# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class TensorName:
    hf: str
    meta: str
    gguf: str
    split_dim: int | None  # dim split across Meta shards; None = copied into every shard
    role: str  # what the tensor is, whatever its layer: the key of LlamaDims.shape_of

    @property
    def permute(self) -> str | None:
        """The q/k permutation ("q" or "k": rows in rotary-half order in HF, interleaved in Meta/GGUF) or None."""
        return self.role if self.role in ("q", "k") else None

    @property
    def norm(self) -> bool:
        return self.role.endswith("norm")

    def at(self, layer: int | None) -> "TensorName":
        if layer is None:
            return self
        return TensorName(self.hf.format(i=layer), self.meta.format(i=layer), self.gguf.format(i=layer),
                          self.split_dim, self.role)


EMBED = TensorName("model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight", 1, "embed")
NORM = TensorName("model.norm.weight", "norm.weight", "output_norm.weight", None, "norm")
OUTPUT = TensorName("lm_head.weight", "output.weight", "output.weight", 0, "output")
# The two tensors that carry the vocabulary, by their Hugging Face names (the merge's vocabulary checks).
EMBED_HF, LM_HEAD_HF = EMBED.hf, OUTPUT.hf
# In Meta's order within a layer (attention, feed-forward, norms), which is the order of its files.
LAYER = (
    TensorName("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight", "blk.{i}.attn_q.weight", 0, "q"),
    TensorName("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight", "blk.{i}.attn_k.weight", 0, "k"),
    TensorName("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight", "blk.{i}.attn_v.weight", 0, "v"),
    TensorName("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", "blk.{i}.attn_output.weight", 1, "o"),
    TensorName("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight", "blk.{i}.ffn_gate.weight", 0, "gate"),
    TensorName("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight", "blk.{i}.ffn_down.weight", 1, "down"),
    TensorName("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight", "blk.{i}.ffn_up.weight", 0, "up"),
    TensorName("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight", "blk.{i}.attn_norm.weight", None, "attn_norm"),
    TensorName("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight", None, "ffn_norm"),
)
# Hugging Face's order within a layer (as save_pretrained and the merge write it).
_HF_LAYER_ORDER = (7, 0, 1, 2, 3, 8, 4, 6, 5)  # input_layernorm, q, k, v, o, post_attn_norm, gate, up, down

# Qwen2's q/k/v biases (Hugging Face and GGUF only: Meta's format has no biases).
BIASES = (
    TensorName("model.layers.{i}.self_attn.q_proj.bias", "", "blk.{i}.attn_q.bias", None, "q_bias"),
    TensorName("model.layers.{i}.self_attn.k_proj.bias", "", "blk.{i}.attn_k.bias", None, "k_bias"),
    TensorName("model.layers.{i}.self_attn.v_proj.bias", "", "blk.{i}.attn_v.bias", None, "v_bias"),
)


# ---------------------------------------------------------------------------------------------
# the families


@dataclass(frozen=True)
class Family:
    """One supported architecture: how its config.json names it and what its exports hold."""

    name: str            # config.json model_type
    architecture: str    # config.json architectures[0]
    gguf_arch: str       # general.architecture of its GGUF (llama.cpp's name)
    meta: bool           # Meta's consolidated.NN.pth format exists for it
    qkv_bias: bool       # q/k/v projections carry biases
    permute_qk: bool     # GGUF stores q/k rows interleaved (llama.cpp's "normal" rope), as Meta does


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", "llama", True, False, True),
    "mistral": Family("mistral", "MistralForCausalLM", "llama", False, False, True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "qwen2", False, True, False),
}
SUPPORTED_ARCHITECTURES = ", ".join(f.architecture for f in FAMILIES.values())


def family_of(cfg: dict, path) -> Family:
    """The family of a Hugging Face config.json, by `architectures` (else `model_type`); anything
    else is one error naming it and the supported list."""
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) else None
    mt = cfg.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise LlamaforgeError(f"model_type is a JSON {type(mt).__name__} ({json.dumps(mt)[:40]}), not a name", path,
                              'restore the model\'s config.json (e.g. "model_type": "llama")')
    for fam in FAMILIES.values():
        if arch == fam.architecture and mt in (None, fam.name):
            return fam
        if arch == fam.architecture:  # a supported architecture, but config.json contradicts itself
            raise LlamaforgeError(
                f"architecture {arch!r} is that of model_type {fam.name!r}, but config.json says model_type {mt!r}",
                path, f"make the two agree: \"model_type\": \"{fam.name}\" for {arch}, or the architecture of "
                f"model_type {mt!r}")
    if arch is None and (mt is None or mt in FAMILIES):
        return FAMILIES[mt or "llama"]
    what = f"architecture {arch!r}" if arch else f"model_type {mt!r}"
    if arch and mt:
        what += f" (model_type {mt!r})"
    raise LlamaforgeError(f"{what} is not supported; supported: {SUPPORTED_ARCHITECTURES}", path,
                          "use a base of a supported family (config.json 'architectures'), or convert the model "
                          "with its own project's tools")


# Stored by some checkpoints, never needed: recomputed from the hyper-parameters.
DERIVED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
DERIVED_META = re.compile(r"^(rope\.freqs|layers\.\d+\.attention\.inner_attention\.rope\.freqs)$")

META_SHARDS = {4096: 1, 5120: 2, 6656: 4, 8192: 8}


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def hf_tensor_order(name: str):
    """Sort key of any Hugging Face tensor name in HF's own order: embeddings, layers by number,
    the final norm, the head (what save_pretrained and the merge write)."""
    group = 0 if "embed_tokens" in name else 3 if name.startswith("lm_head") else 1 if ".layers." in name else 2
    return (group, _natural(name))


def meta_order(n_layers: int) -> list[TensorName]:
    """Every tensor in the order of Meta's consolidated files (which always hold `output`)."""
    out = [EMBED, NORM, OUTPUT]
    for i in range(n_layers):
        out += [t.at(i) for t in LAYER]
    return out


def hf_order(n_layers: int, with_output: bool = True, biases: bool = False) -> list[TensorName]:
    """Every tensor in Hugging Face's order (embeddings, layers, final norm, head); with_output=False
    leaves the head out (a model with tied embeddings stores none); biases=True adds Qwen2's q/k/v
    biases, each after its weight."""
    out = [EMBED]
    for i in range(n_layers):
        for k in _HF_LAYER_ORDER:
            out.append(LAYER[k].at(i))
            if biases and k < 3:
                out.append(BIASES[k].at(i))
    out.append(NORM)
    if with_output:
        out.append(OUTPUT)
    return out


def by_hf(n_layers: int, biases: bool = False) -> dict[str, TensorName]:
    return {t.hf: t for t in hf_order(n_layers, biases=biases)}


def by_meta(n_layers: int) -> dict[str, TensorName]:
    return {t.meta: t for t in meta_order(n_layers)}


# ---------------------------------------------------------------------------------------------
# q/k permutation


def permute_into(out: torch.Tensor, w: torch.Tensor, heads: int, to_meta: bool) -> torch.Tensor:
    """The rows of a q/k weight `w` put in Meta/GGUF order (to_meta: HF's rotary halves -> interleaved
    pairs, `w.view(heads, 2, head_dim // 2, in).transpose(1, 2)`) or back to Hugging Face order,
    per head, written into `out` (same shape) without a temporary."""
    rows = w.shape[0]
    half = rows // heads // 2
    rest = tuple(w.shape[1:])
    if to_meta:
        out.view(heads, half, 2, *rest).copy_(w.view(heads, 2, half, *rest).transpose(1, 2))
    else:
        out.view(heads, 2, half, *rest).copy_(w.view(heads, half, 2, *rest).transpose(1, 2))
    return out


# ---------------------------------------------------------------------------------------------
# hyper-parameters


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


def rope_settings(cfg: dict) -> tuple[float, str, dict]:
    """(rope_theta, rope_type, parameters) from a config.json of transformers 4 (rope_theta,
    rope_scaling) or 5 (rope_parameters)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise TypeError("'rope_parameters' / 'rope_scaling' (not an object)")
    for where, key in ((params, "rope_theta"), (cfg, "rope_theta")):
        if key in where and where[key] is None and _get(params, key) is None:
            raise TypeError("'rope_theta' (null, not a number)")
    theta = _number(_get(params, "rope_theta", default=_get(cfg, "rope_theta", default=10000.0)), "rope_theta")
    rtype = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, rtype, {**scaling, **params}


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


# ---- Meta shards -----------------------------------------------------------------------------


def default_num_shards(hidden: int) -> int:
    """Meta's model-parallel size for a hidden size (7B 1, 13B 2, 33B 4, 65B/70B 8; others 1)."""
    return META_SHARDS.get(int(hidden), 1)


def split_sizes(total: int, n: int, uneven: bool) -> list[int]:
    """Sizes of a dimension split over n shards: equal, or (uneven=True) total // n each and the
    remainder on the last shard."""
    if n == 1:
        return [total]
    if total % n:
        if not uneven:
            raise ValueError(f"{total} does not divide into {n} shards")
        chunk = total // n
        if chunk == 0:
            raise ValueError(f"{total} rows cannot be split into {n} shards")
        return [chunk] * (n - 1) + [total - chunk * (n - 1)]
    return [total // n] * n


def shard_ranges(t: TensorName, shape: tuple[int, ...], n: int, path=None) -> list[tuple[int, int] | None]:
    """For each shard, the (start, stop) of the tensor along t.split_dim, or None for a copied tensor."""
    if t.split_dim is None or n == 1:
        return [None if t.split_dim is None else (0, shape[t.split_dim])] * n
    total = shape[t.split_dim]
    uneven = t == OUTPUT  # only the vocabulary may split unevenly
    try:
        sizes = split_sizes(total, n, uneven)
    except ValueError:
        raise LlamaforgeError(
            f"{t.meta} has {total} along dim {t.split_dim}, which does not divide into {n} shards", path,
            "choose a --num-shards (pth_shards: in config.yaml) that divides the hidden, head and FFN sizes",
        ) from None
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def check_shardable(dims: LlamaDims, n: int, path=None) -> None:
    """Heads must not straddle shards (the q/k permutation is per head)."""
    for what, heads in (("num_attention_heads", dims.n_heads), ("num_key_value_heads", dims.n_kv_heads)):
        if heads % n:
            raise LlamaforgeError(f"{what} = {heads} does not divide into {n} shards", path,
                                  "choose a --num-shards (pth_shards: in config.yaml) that divides the head counts")
    for t in meta_order(1):
        shard_ranges(t, dims.shape_of(t), n, path)


# ---- params.json <-> config.json -------------------------------------------------------------

# Published shapes whose Meta parameters are known (LLaMA-2/3 70B, LLaMA-3 8B, Code Llama 34B).
_KNOWN_FFN = {(8192, 28672): (4096, 1.3), (4096, 14336): (1024, 1.3), (8192, 22016): (256, None),
              (5120, 13824): (256, None), (4096, 11008): (256, None), (6656, 17920): (256, None)}


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width (llama/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_closed_form(dim: int, multiple_of: int, m: float | None) -> int:
    # The same, as usually written: multiple_of * ceil(int(8*dim/3) * m / multiple_of).
    return multiple_of * math.ceil(int(8 * dim / 3) * (1.0 if m is None else m) / multiple_of)


def ffn_params(dim: int, intermediate: int, path=None) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier or None) that reproduce `intermediate` for `dim` exactly."""
    def ok(mo, m):
        return meta_ffn_dim(dim, mo, m) == intermediate and _ffn_closed_form(dim, mo, m) == intermediate

    known = _KNOWN_FFN.get((dim, intermediate))
    if known and ok(*known):
        return known
    ladder = (256, 128, 64, 32, 16, 8, 4, 2, 1)
    for mo in ladder:
        if ok(mo, None):
            return mo, None
    base = int(8 * dim / 3)
    if base > 0:
        for mo in ladder:
            if intermediate % mo:
                continue
            exact = intermediate / base
            for digits in range(1, 9):  # the shortest multiplier that works, e.g. 1.3
                for m in (round(exact, digits), round(exact + 0.5 * 10 ** -digits, digits)):
                    if ok(mo, m):
                        return mo, m
            m = exact
            for _ in range(4):
                if ok(mo, m):
                    return mo, m
                m = math.nextafter(m, math.inf)
    raise LlamaforgeError(
        f"no multiple_of / ffn_dim_multiplier reproduces intermediate_size {intermediate} for hidden size {dim} "
        "with Meta's FFN formula", path, "export this model to GGUF or Hugging Face format instead",
    )


def params_from_dims(dims: LlamaDims, path=None) -> dict:
    """params.json for a model (the real vocab size, not the -1 of the original releases)."""
    if dims.head_dim and dims.head_dim * dims.n_heads != dims.hidden:
        raise LlamaforgeError(f"head_dim {dims.head_dim} x {dims.n_heads} heads != hidden size {dims.hidden}", path,
                              "Meta's format derives head_dim from dim / n_heads: export to GGUF instead")
    multiple_of, mult = ffn_params(dims.hidden, dims.intermediate, path)
    params: dict = {"dim": dims.hidden, "multiple_of": multiple_of, "n_heads": dims.n_heads}
    if dims.n_kv_heads != dims.n_heads:
        params["n_kv_heads"] = dims.n_kv_heads
    params.update({"n_layers": dims.n_layers, "norm_eps": dims.norm_eps, "vocab_size": dims.vocab})
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    if dims.rope_theta != 10000.0:
        params["rope_theta"] = dims.rope_theta
    return params


def default_max_positions(params: dict) -> int:
    """Meta's params.json has no context length. LLaMA-1 (norm_eps 1e-6) was trained on 2048 tokens,
    LLaMA-2 (norm_eps 1e-5) on 4096, Llama-3 (rope_theta 500000) on 8192, and Llama-3.1/3.2
    (use_scaled_rope) reach 131072; `max_seq_len`, when present, wins."""
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params.get("use_scaled_rope"):  # Llama-3.1/3.2: 128K
        return 131072
    if float(params.get("rope_theta", 10000.0)) == 500000.0:  # Llama-3: 8K
        return 8192
    return 4096 if float(params.get("norm_eps", 1e-6)) >= 1e-5 else 2048


def dims_from_params(params: dict, vocab_rows: int, path=None, max_positions: int | None = None) -> LlamaDims:
    """LlamaDims from params.json; vocab_size -1 (the original releases) takes the embedding rows."""
    try:
        dim = int(params["dim"])
        n_heads = int(params["n_heads"])
        mult = params.get("ffn_dim_multiplier")
        multiple_of = int(params.get("multiple_of", 256))
        if multiple_of < 1 or (mult is not None and not (math.isfinite(float(mult)) and float(mult) > 0)):
            raise ValueError("'multiple_of' / 'ffn_dim_multiplier' (not a positive number)")
        vocab = int(params.get("vocab_size", -1))
        dims = LlamaDims(
            hidden=dim,
            intermediate=meta_ffn_dim(dim, multiple_of, None if mult is None else float(mult)),
            n_layers=int(params["n_layers"]), n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            vocab=vocab if vocab > 0 else vocab_rows, norm_eps=float(params.get("norm_eps", 1e-6)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_positions=max_positions or default_max_positions(params),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise LlamaforgeError(f"params.json lacks or garbles {e}", path,
                              "use the params.json that came with the consolidated.*.pth files") from None
    check_dims(dims, path, "use the params.json that came with the consolidated.*.pth files")
    if dims.vocab != vocab_rows:
        raise LlamaforgeError(f"params.json says vocab_size {dims.vocab} but tok_embeddings has {vocab_rows} rows",
                              path, "set vocab_size to the embedding rows (or -1)")
    return dims


def config_from_dims(dims: LlamaDims, dtype: str, bos: int | None = 1, eos: int | None = 2,
                     pad: int | None = None) -> dict:
    """config.json of a LlamaForCausalLM (read by transformers 4.x and 5.x alike)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dims.hidden, "intermediate_size": dims.intermediate,
        "num_attention_heads": dims.n_heads, "num_key_value_heads": dims.n_kv_heads,
        "num_hidden_layers": dims.n_layers, "head_dim": dims.hd, "rms_norm_eps": dims.norm_eps,
        "vocab_size": dims.vocab, "max_position_embeddings": dims.max_positions,
        "rope_theta": dims.rope_theta, "hidden_act": "silu", "initializer_range": 0.02,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": False, "use_cache": True, "torch_dtype": dtype,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
    }
    return cfg
