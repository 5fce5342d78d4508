"""The tensors of a LLaMA-family model: each one's Hugging Face, Meta and GGUF names, its role, its
Meta shard split and the value transforms an export applies (docs/ARCHITECTURE.md, "The tensor
table"). Which of them a family has, in which order, is the family's entry (model/families.py).

**q/k order.** Hugging Face's conversion permutes the rows of wq and wk per head so that its
rotary embedding can rotate halves; Meta and GGUF (llama.cpp's "normal" rope) keep the interleaved
order. HF -> Meta/GGUF is `w.view(heads, 2, head_dim // 2, in).transpose(1, 2)` (llama.cpp's
`LlamaModel.permute`); Meta -> HF is the inverse `w.view(heads, head_dim // 2, 2, in).transpose(1, 2)`
(transformers' convert_llama_weights_to_hf.py). `heads` is n_kv_heads for wk (grouped-query attention).

Rotary `inv_freq` buffers (HF) and `rope.freqs` (LLaMA-1 .pth) are derived, never stored.
No torch here: a tensor is only touched by `permute_into`, through its own methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorName:
    hf: str
    meta: str
    gguf: str
    split_dim: int | None  # dim split across Meta shards; None = copied into every shard
    role: str  # what the tensor is, whatever its layer: the key of LlamaDims.shape_of
    offset: float = 0.0  # added to every value on the way to GGUF/Meta (a norm stored as w - 1 in HF)

    @property
    def permute(self) -> str | None:
        """The q/k permutation ("q" or "k": rows in rotary-half order in HF, interleaved in Meta/GGUF) or None."""
        return self.role if self.role in ("q", "k") else None

    @property
    def norm(self) -> bool:
        return self.role.endswith("norm")

    def shifted(self, offset: float) -> "TensorName":
        """The same tensor stored as w - offset in Hugging Face (Gemma's RMSNorms: 1 + w)."""
        return replace(self, offset=offset)

    def at(self, layer: int | None) -> "TensorName":
        if layer is None:
            return self
        return TensorName(self.hf.format(i=layer), self.meta.format(i=layer), self.gguf.format(i=layer),
                          self.split_dim, self.role, self.offset)


EMBED = TensorName("model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight", 1, "embed")
NORM = TensorName("model.norm.weight", "norm.weight", "output_norm.weight", None, "norm")
OUTPUT = TensorName("lm_head.weight", "output.weight", "output.weight", 0, "output")
# The two tensors that carry the vocabulary, by their Hugging Face names (the merge's vocabulary checks).
EMBED_HF, LM_HEAD_HF = EMBED.hf, OUTPUT.hf
# One layer's tensors by role (Meta's names where Meta has them; "" where it has none).
_L = "model.layers.{i}."
Q = TensorName(_L + "self_attn.q_proj.weight", "layers.{i}.attention.wq.weight", "blk.{i}.attn_q.weight", 0, "q")
K = TensorName(_L + "self_attn.k_proj.weight", "layers.{i}.attention.wk.weight", "blk.{i}.attn_k.weight", 0, "k")
V = TensorName(_L + "self_attn.v_proj.weight", "layers.{i}.attention.wv.weight", "blk.{i}.attn_v.weight", 0, "v")
O = TensorName(_L + "self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", "blk.{i}.attn_output.weight", 1, "o")  # noqa: E741
GATE = TensorName(_L + "mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight", "blk.{i}.ffn_gate.weight", 0, "gate")
DOWN = TensorName(_L + "mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight", "blk.{i}.ffn_down.weight", 1, "down")
UP = TensorName(_L + "mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight", "blk.{i}.ffn_up.weight", 0, "up")
ATTN_NORM = TensorName(_L + "input_layernorm.weight", "layers.{i}.attention_norm.weight", "blk.{i}.attn_norm.weight",
                       None, "attn_norm")
FFN_NORM = TensorName(_L + "post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight",
                      None, "ffn_norm")
# q/k/v biases (Qwen2; Hugging Face and GGUF only: Meta's format has no biases)
Q_BIAS = TensorName(_L + "self_attn.q_proj.bias", "", "blk.{i}.attn_q.bias", None, "q_bias")
K_BIAS = TensorName(_L + "self_attn.k_proj.bias", "", "blk.{i}.attn_k.bias", None, "k_bias")
V_BIAS = TensorName(_L + "self_attn.v_proj.bias", "", "blk.{i}.attn_v.bias", None, "v_bias")
# per-head RMSNorms of q and k ([head_dim]; Qwen3, Gemma-3; Hugging Face and GGUF only)
Q_NORM = TensorName(_L + "self_attn.q_norm.weight", "", "blk.{i}.attn_q_norm.weight", None, "q_norm")
K_NORM = TensorName(_L + "self_attn.k_norm.weight", "", "blk.{i}.attn_k_norm.weight", None, "k_norm")
# fused projections (Phi-3): q, k and v rows stacked in one matrix; gate and up rows stacked (gate
# first), which llama.cpp's phi3 graph splits as Hugging Face's Phi3MLP does (GGUF ffn_up holds both)
QKV = TensorName(_L + "self_attn.qkv_proj.weight", "", "blk.{i}.attn_qkv.weight", None, "qkv")
GATE_UP = TensorName(_L + "mlp.gate_up_proj.weight", "", "blk.{i}.ffn_up.weight", None, "gate_up")
# the sandwich norms around attention and the feed-forward (Gemma-2/3): HF's post_attention_layernorm is
# then a norm after attention, not before the feed-forward (FFN_NORM's meaning in LLaMA)
POST_ATTN_NORM = TensorName(_L + "post_attention_layernorm.weight", "", "blk.{i}.post_attention_norm.weight", None,
                            "post_attn_norm")
PRE_FFN_NORM = TensorName(_L + "pre_feedforward_layernorm.weight", "", "blk.{i}.ffn_norm.weight", None, "ffn_norm")
POST_FFN_NORM = TensorName(_L + "post_feedforward_layernorm.weight", "", "blk.{i}.post_ffw_norm.weight", None,
                           "post_ffn_norm")
# In Meta's order within a layer (attention, feed-forward, norms), which is the order of its files.
LAYER = (Q, K, V, O, GATE, DOWN, UP, ATTN_NORM, FFN_NORM)
BIASES = (Q_BIAS, K_BIAS, V_BIAS)

# Stored by some checkpoints, never needed: recomputed from the hyper-parameters.
DERIVED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
DERIVED_META = re.compile(r"^(rope\.freqs|layers\.\d+\.attention\.inner_attention\.rope\.freqs)$")


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def hf_tensor_order(name: str):
    """Sort key of any Hugging Face tensor name in HF's own order: embeddings, layers by number,
    the final norm, the head (what save_pretrained and the merge write)."""
    group = 0 if "embed_tokens" in name else 3 if name.startswith("lm_head") else 1 if ".layers." in name else 2
    return (group, _natural(name))


def permute_into(out: "torch.Tensor", w: "torch.Tensor", heads: int, to_meta: bool) -> "torch.Tensor":
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

