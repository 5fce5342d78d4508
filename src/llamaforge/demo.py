"""The embedded `demo` model: every input of the Chinese-LLaMA/Alpaca recipe, in miniature.

Generated deterministically from a seed, with no download:

    resources/demo/sp/base.model          LLaMA-shaped SentencePiece (BPE, byte fallback, unk/bos/eos 0/1/2)
    resources/demo/sp/chinese.model       Chinese SentencePiece (unigram, as the real one)
    resources/demo/base/                  tiny LLaMA in Hugging Face format, 2 safetensors shards + index
    resources/demo/lora_llama_plus/       PEFT LoRA like Chinese-LLaMA-Plus (r=8, alpha=32, all projections,
                                          full embed_tokens/lm_head for the merged vocabulary) + its tokenizer
    resources/demo/lora_alpaca_plus/      PEFT LoRA like Chinese-Alpaca-Plus (as above, vocabulary + [PAD])

The adapters are made with PEFT itself (`get_peft_model` + `save_pretrained`), so their key names
and config are what a user's real adapters look like.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from .errors import LlamaforgeError
from .files.atomic import atomic_dir, write_json
from .files.guard import guard_output, json_of_kind, register_output_kind
from .tokenizer import bundled_text, merge_protos, write_hf_tokenizer

# hidden 256, 2 layers: small enough to build and test in seconds, shaped like LLaMA, and sized so
# llama.cpp's K-quants apply to every matrix (their rows must be a multiple of 256 values); the FFN
# width is Meta's formula for dim 256 (multiple_of 256).
DEMO_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

BASE_FILES = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors", "model.safetensors.index.json",
              "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
LORA_FILES = ["adapter_config.json", "adapter_model.safetensors",
              "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
SP_FILES = ["sp/base.model", "sp/chinese.model"]

# a demo folder is llamaforge's by its manifest, llamaforge.json {"llamaforge": "demo", "seed": ...}
register_output_kind("demo", "demo folder", lambda p: json_of_kind("demo")(p / "llamaforge.json"), folder=True)


def demo_files() -> list[str]:
    """Every file make_demo writes, relative to its output folder (the Snakemake rule's outputs)."""
    return (SP_FILES + [f"base/{f}" for f in BASE_FILES]
            + [f"lora_llama_plus/{f}" for f in LORA_FILES] + [f"lora_alpaca_plus/{f}" for f in LORA_FILES])


def _train_sp(text: str, **kwargs) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    # A sentence iterator (not a file) keeps the input path out of the model; one thread keeps it
    # deterministic.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=out,
                                   num_threads=1, minloglevel=2, **kwargs)
    return out.getvalue()


def train_base_sp() -> bytes:
    """BPE with byte fallback and LLaMA's special ids and options, on the bundled English text."""
    return _train_sp(
        bundled_text("english.txt"), model_type="bpe", vocab_size=512, byte_fallback=True,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, max_sentence_length=4192, add_dummy_prefix=True,
    )


def train_chinese_sp() -> bytes:
    """Unigram on the bundled classical Chinese text, as Chinese-LLaMA's 20k model (in miniature)."""
    return _train_sp(
        bundled_text("chinese.txt"), model_type="unigram", vocab_size=800, hard_vocab_limit=False,
        character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",  # keep full-width punctuation (，。), as the real model does
    )


def _proto(data: bytes):
    from .tokenizer import _pb2

    p = _pb2().ModelProto()
    p.ParseFromString(data)
    return p


def _normalize_adapter_config(path: Path, base_name: str) -> None:
    """PEFT writes target_modules from a set (order varies run to run); make the file deterministic."""
    cfg = json.loads(path.read_text())
    for key, value in cfg.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            cfg[key] = sorted(value)
    cfg["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _make_lora(base_model, vocab: int, out: Path, seed: int, base_name: str) -> None:
    """A Chinese-LLaMA-style adapter made with PEFT: LoRA on every projection, full embed/lm_head."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base_model).float()
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab, mean_resizing=False)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=LORA_TARGETS, modules_to_save=["embed_tokens", "lm_head"],
                     lora_dropout=0.05, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                # non-zero B (PEFT initialises it to zero), so every delta is visible
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                # trained full tensors: the base rows moved a little, the new rows learned from scratch
                w = p.clone()
                w[:old] += torch.randn(w[:old].shape, generator=g) * 0.002
                w[old:] = torch.randn(w[old:].shape, generator=g) * 0.02
                p.copy_(w)
    peft_model.half()  # the real releases store float16 adapters
    peft_model.save_pretrained(os.fspath(out), safe_serialization=True)
    _normalize_adapter_config(out / "adapter_config.json", base_name)
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()


def _save_two_shards(model, out: Path) -> int:
    """Save `model` as two safetensors shards + index, split at the middle byte (a multi-file checkpoint)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(os.fspath(out))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts: list[dict] = [{}, {}]
    done = 0
    for key, value in state.items():
        parts[0 if done < total // 2 else 1][key] = value
        done += value.numel() * value.element_size()
    weight_map = {}
    for name, part in zip(names, parts):
        save_file(part, os.fspath(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def make_demo(output: str | os.PathLike, seed: int = 42, echo=print) -> None:
    """Write every demo input under `output/` (atomically: all or nothing)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if not 0 <= seed < 2**32:
        raise LlamaforgeError(f"the demo seed is {seed}; it must be 0 to 4294967295", None,
                              "set demo.seed in config.yaml (or --seed) to such a number, e.g. 42")
    guard_output(output, "demo")
    torch.set_num_threads(1)  # bit-identical weights whatever the machine's thread count
    with atomic_dir(output) as tmp:
        write_json(tmp / "llamaforge.json", {"llamaforge": "demo", "seed": seed})
        (tmp / "sp").mkdir()
        base_sp, zh_sp = train_base_sp(), train_chinese_sp()
        (tmp / "sp" / "base.model").write_bytes(base_sp)
        (tmp / "sp" / "chinese.model").write_bytes(zh_sp)
        base_proto = _proto(base_sp)
        plus_proto, plus = merge_protos(base_proto, _proto(zh_sp))
        alpaca_proto, _ = merge_protos(base_proto, _proto(zh_sp), ["[PAD]"])
        echo(f"demo tokenizers: base {len(base_proto.pieces)} pieces, +{len(plus.added)} Chinese = "
             f"{len(plus_proto.pieces)}, +[PAD] = {len(alpaca_proto.pieces)}")

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(base_proto.pieces), bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False, **DEMO_SHAPE)
        model = LlamaForCausalLM(config).to(torch.float16)
        model.config.dtype = torch.float16
        base_dir = tmp / "base"
        total = _save_two_shards(model, base_dir)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(os.fspath(base_dir))
        write_hf_tokenizer(base_proto, base_dir, model_bytes=base_sp)
        shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
        if len(shards) != 2:
            raise RuntimeError(f"expected 2 demo shards, got {shards}")
        echo(f"demo base: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab "
             f"{config.vocab_size}, {total} bytes in {len(shards)} shards")

        for name, proto, add, s in (("lora_llama_plus", plus_proto, [], seed + 1),
                                    ("lora_alpaca_plus", alpaca_proto, ["[PAD]"], seed + 2)):
            d = tmp / name
            _make_lora(model, len(proto.pieces), d, s, base_name="resources/demo/base")
            write_hf_tokenizer(proto, d, add)
            echo(f"demo adapter {name}: r=8, alpha=32, vocab {len(proto.pieces)}")

        missing = [f for f in demo_files() if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"demo generation did not write {missing}")


def synthetic_sp_model(n_pieces: int) -> bytes:
    """A LLaMA-like BPE SentencePiece model with `n_pieces` (specials, 256 byte pieces, then filler
    pieces "▁w0", "▁w1", ... with falling scores), made without training: any vocabulary size in
    an instant, for benchmarks and tests at realistic shapes."""
    from .tokenizer import BYTE, CONTROL, UNKNOWN, _pb2

    pb2 = _pb2()
    m = pb2.ModelProto()
    m.trainer_spec.model_type = 2
    m.trainer_spec.vocab_size = n_pieces
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    for piece, t in (("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, t
    for b in range(256):
        p = m.pieces.add()
        p.piece, p.score, p.type = f"<0x{b:02X}>", 0.0, BYTE
    k = 0
    while len(m.pieces) < n_pieces:
        p = m.pieces.add()
        p.piece, p.score = f"▁w{k}", -float(k)
        k += 1
    return m.SerializeToString()
