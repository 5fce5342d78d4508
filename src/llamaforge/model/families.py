"""The family table: what differs between the supported architectures, one entry each.

An entry says how config.json names the architecture, which tensors one layer holds (in Hugging
Face's order, each with its role, Meta shard split and value transform: model/tensors.py), how
the GGUF names it and which of llama.cpp's converter rules apply to it, whether Meta's
consolidated.NN.pth format exists for it, and which prompt style its exports default to when its
tokenizer has no chat template. Every other module asks the entry; none tests a family's name.

Adding a family is one entry here plus its test model (docs/ARCHITECTURE.md, "Adding a family").
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import LlamaforgeError
from .tensors import (
    ATTN_NORM,
    DOWN,
    EMBED,
    FFN_NORM,
    GATE,
    GATE_UP,
    K_BIAS,
    K_NORM,
    QKV,
    POST_ATTN_NORM,
    POST_FFN_NORM,
    PRE_FFN_NORM,
    NORM,
    OUTPUT,
    Q_BIAS,
    Q_NORM,
    UP,
    V_BIAS,
    K,
    O,
    Q,
    TensorName,
    V,
)


@dataclass(frozen=True)
class Family:
    """One supported architecture: how its config.json names it and what its exports hold."""

    name: str                        # config.json model_type
    architectures: tuple[str, ...]   # config.json architectures[0] (the first is the one we write)
    gguf_arch: str                   # general.architecture of its GGUF (llama.cpp's name)
    layer: tuple[TensorName, ...]    # one layer's tensors in Hugging Face's order (save_pretrained's)
    meta: bool                       # Meta's consolidated.NN.pth format exists for it
    permute_qk: bool                 # GGUF stores q/k rows interleaved (llama.cpp's "normal" rope), as Meta does
    # llama.cpp's LlamaModel rules (convert_hf_to_gguf.py): llama.vocab_size and rope_dimension_count
    # keys, tokenizer_config's add_prefix_space, rope_freqs.weight for llama3 rope scaling, no BOS for
    # the 49152-token vocabulary (SmolLM, Granite)
    llama_gguf_rules: bool
    prompt_style: str = "alpaca"     # prompts.FORMATS name used when the tokenizer has no chat template
    final_norm: TensorName = NORM    # the final norm (a family may give it a value offset, as its layer norms)
    # GGUF keys the converter writes from config.json for this family alone: ("{arch}." suffix,
    # config.json key, GGUF value type), written when config.json sets the key
    gguf_keys: tuple[tuple[str, str, str, float | None], ...] = ()  # (..., default where config.json has null)
    # tokenizer.ggml.add_space_prefix of a SentencePiece vocabulary: None = the tokenizer's own
    # (tokenizer_config.json's add_prefix_space, under llama_gguf_rules), else this value
    space_prefix: bool | None = None
    # which converter class's rope keys: "text" (TextModel's: the rope scaling type and factor from
    # config.json, key/value length from head_dim) or "phi3" (Phi3MiniModel's: rope.dimension_count from
    # partial_rotary_factor, the original context length, longrope as rope_factors_long/short tensors
    # and an attention factor, no scaling type and no key length)
    rope_keys: str = "text"
    # which converter's SentencePiece vocabulary: "llama" (_create_vocab_sentencepiece: added_tokens.json,
    # then tokenizer_config.json's added_tokens_decoder, tokens that look special CONTROL) or "phi3"
    # (Phi3MiniModel.set_vocab: those, CONTROL only where marked special, then tokenizer.json's added_tokens)
    sp_vocab: str = "llama"

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @property
    def qkv_bias(self) -> bool:
        """The q/k/v projections carry biases."""
        return any(t.role.endswith("_bias") for t in self.layer)

    def hf_order(self, n_layers: int, with_output: bool = True) -> list[TensorName]:
        """Every tensor in Hugging Face's order (embeddings, layers, final norm, head); with_output=False
        leaves the head out (a model with tied embeddings stores none)."""
        out = [EMBED]
        for i in range(n_layers):
            out += [t.at(i) for t in self.layer]
        out.append(self.final_norm)
        if with_output:
            out.append(OUTPUT)
        return out

    def by_hf(self, n_layers: int) -> dict[str, TensorName]:
        return {t.hf: t for t in self.hf_order(n_layers)}


_LLAMA_LAYER = (ATTN_NORM, Q, K, V, O, FFN_NORM, GATE, UP, DOWN)
_QWEN2_LAYER = (ATTN_NORM, Q, Q_BIAS, K, K_BIAS, V, V_BIAS, O, FFN_NORM, GATE, UP, DOWN)
# Gemma-3: every RMSNorm stored as w - 1 (Gemma3RMSNorm multiplies by 1 + w; the GGUF holds 1 + w),
# sandwich norms around attention and the feed-forward, q/k norms
_G = 1.0
_GEMMA3_LAYER = (ATTN_NORM.shifted(_G), Q, K, V, O, Q_NORM.shifted(_G), K_NORM.shifted(_G),
                 POST_ATTN_NORM.shifted(_G), PRE_FFN_NORM.shifted(_G), POST_FFN_NORM.shifted(_G), GATE, UP, DOWN)
# Phi-3 / Phi-3.5 / Phi-4-mini: fused q/k/v and gate/up projections (LoRA adapters target them fused)
_PHI3_LAYER = (ATTN_NORM, QKV, O, FFN_NORM, GATE_UP, DOWN)
# Qwen3: no biases, RMSNorms of q and k per head (head_dim from config.json)
_QWEN3_LAYER = (ATTN_NORM, Q, K, V, O, Q_NORM, K_NORM, FFN_NORM, GATE, UP, DOWN)

FAMILIES = {
    "llama": Family("llama", ("LlamaForCausalLM",), "llama", _LLAMA_LAYER, meta=True, permute_qk=True,
                    llama_gguf_rules=True),
    "mistral": Family("mistral", ("MistralForCausalLM",), "llama", _LLAMA_LAYER, meta=False, permute_qk=True,
                      llama_gguf_rules=True),
    "qwen2": Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", _QWEN2_LAYER, meta=False, permute_qk=False,
                    llama_gguf_rules=False),
    "qwen3": Family("qwen3", ("Qwen3ForCausalLM",), "qwen3", _QWEN3_LAYER, meta=False, permute_qk=False,
                    llama_gguf_rules=False),
    "gemma3_text": Family("gemma3_text", ("Gemma3ForCausalLM",), "gemma3", _GEMMA3_LAYER, meta=False,
                          permute_qk=False, llama_gguf_rules=False, final_norm=NORM.shifted(_G),
                          gguf_keys=(("attention.sliding_window", "sliding_window", "uint32", None),
                                     ("final_logit_softcapping", "final_logit_softcapping", "float32", None)),
                          space_prefix=False),
    "phi3": Family("phi3", ("Phi3ForCausalLM",), "phi3", _PHI3_LAYER, meta=False, permute_qk=False,
                   llama_gguf_rules=False, rope_keys="phi3", sp_vocab="phi3",
                   gguf_keys=(("attention.sliding_window", "sliding_window", "uint32", 0),)),
}
# Architectures of a supported family's checkpoints that are refused with their own reason and fix.
REFUSED = {
    "Gemma3ForConditionalGeneration": (
        "is Gemma-3's multimodal checkpoint (a vision tower beside the language model); llamaforge takes "
        "the text-only Gemma3ForCausalLM",
        "use a text-only Gemma-3 (gemma-3-1b, or the text model of a larger one saved as Gemma3ForCausalLM), "
        "or llama.cpp's convert_hf_to_gguf.py with --mmproj for the vision tower"),
}
LLAMA = FAMILIES["llama"]
SUPPORTED_ARCHITECTURES = ", ".join(a for f in FAMILIES.values() for a in f.architectures)


def family_of(cfg: dict, path) -> Family:
    """The family of a Hugging Face config.json, by `architectures` (else `model_type`); anything
    else is one error naming it and the supported list."""
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) else None
    mt = cfg.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise LlamaforgeError(f"model_type is a JSON {type(mt).__name__} ({json.dumps(mt)[:40]}), not a name", path,
                              'restore the model\'s config.json (e.g. "model_type": "llama")')
    if arch in REFUSED:
        why, fix = REFUSED[arch]
        raise LlamaforgeError(f"architecture {arch!r} {why}", path, fix)
    for fam in FAMILIES.values():
        if arch in fam.architectures and mt in (None, fam.name):
            return fam
        if arch in fam.architectures:  # a supported architecture, but config.json contradicts itself
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


# Meta's consolidated files: LLaMA's tensors in Meta's order (attention, feed-forward, norms in a
# layer), which is the order of its files.
_META_LAYER = (Q, K, V, O, GATE, DOWN, UP, ATTN_NORM, FFN_NORM)


def meta_order(n_layers: int) -> list[TensorName]:
    """Every tensor in the order of Meta's consolidated files (which always hold `output`)."""
    out = [EMBED, NORM, OUTPUT]
    for i in range(n_layers):
        out += [t.at(i) for t in _META_LAYER]
    return out


def by_meta(n_layers: int) -> dict[str, TensorName]:
    return {t.meta: t for t in meta_order(n_layers)}


def hf_order(n_layers: int, with_output: bool = True, family: Family = LLAMA) -> list[TensorName]:
    """`family`'s tensors in Hugging Face's order (Family.hf_order)."""
    return family.hf_order(n_layers, with_output)
