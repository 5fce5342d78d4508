"""Meta's consolidated.NN.pth layout: shard counts and splits, and params.json <-> config.json.

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

import math

from ..errors import LlamaforgeError
from .dims import LlamaDims, check_dims
from .families import meta_order
from .tensors import OUTPUT, TensorName

META_SHARDS = {4096: 1, 5120: 2, 6656: 4, 8192: 8}



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

