"""Trained embeddings on tied models (issue 22): an adapter whose `modules_to_save` holds
`embed_tokens` (and `lm_head`) on a base with tie_word_embeddings. PEFT gives each saved module its
own copy, so the trained model is untied: the merge keeps both trained tensors, writes
tie_word_embeddings false and the GGUF gets output.weight (peft#2777: PEFT's merge and transformers'
save have got this wrong). With `embed_tokens` alone, PEFT's forward keeps the head on the base's
(untrained) embedding, so the merge unties there too, the head being the base embedding.

The reference is computed independently of any merge: the per-module weights of the PEFT model
loaded from the adapter, and its logits with the adapter active (unmerged). Parametrized over every
tied family of tests/families.py (a family whose config has tie_word_embeddings is included)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from families import FAMILIES, family_config, family_tokenizer, llama_cpp_model, make_family_model, read_gguf
from helpers import hf_tensors

TIED_FAMILIES = tuple(f for f in FAMILIES if family_config(f, 256).tie_word_embeddings)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
IDS = [5, 17, 300, 1000, 42, 7, 99, 2500, 31, 12]
QUIET = dict(echo=lambda *a: None, progress=False)


def make_tied_adapter(base: Path, out: Path, modules: list[str], seed: int = 3, **extra) -> Path:
    """A PEFT LoRA (q/v projections) with `modules` in modules_to_save, each trained copy moved away
    from the base (as training does), saved by PEFT itself. `extra`: more LoraConfig settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.0,
                     target_modules=["q_proj", "v_proj"], modules_to_save=modules, **extra)
    with warnings.catch_warnings():  # PEFT warns that a tied layer is saved without ensure_weight_tying
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * p.std())
    peft_model.save_pretrained(out)
    return out


def peft_reference(base: Path, adapter: Path) -> dict:
    """{embed, head, logits} of the PEFT model loaded from `adapter` (float32), unmerged: the weights
    its embedding and head modules use in the forward, and the logits of IDS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, adapter).eval()
    inner = pm.get_base_model()
    with torch.no_grad():
        logits = pm(torch.tensor([IDS])).logits[0]
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()

    def pick(mod):  # the trained copy of a modules_to_save wrapper, else the module's own weight
        return mod.modules_to_save["default"].weight if hasattr(mod, "modules_to_save") else mod.weight

    return {"embed": pick(emb).detach().clone(), "head": pick(head).detach().clone(), "logits": logits}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """{(family, modules): dict(base, adapter, merged, ref)}: the tied base of a family built once, an
    adapter and its merge per case."""
    from llamaforge.merge import merge_lora

    bases: dict = {}
    cache: dict = {}

    def build(name: str, modules: tuple[str, ...], ensure_weight_tying: bool = False) -> dict:
        if name not in bases:
            root = tmp_path_factory.mktemp(f"tied-{name}")
            tok, rows = family_tokenizer(name, root / "tokenizer")
            bases[name] = make_family_model(root / "base", name, tok, rows)
            assert json.loads((bases[name] / "config.json").read_text())["tie_word_embeddings"] is True
        key = (name, modules, ensure_weight_tying)
        if key not in cache:
            base = bases[name]
            root = tmp_path_factory.mktemp(f"tied-{name}-{len(modules)}")
            extra = {"ensure_weight_tying": True} if ensure_weight_tying else {}
            adapter = make_tied_adapter(base, root / "adapter", list(modules), **extra)
            merged = root / "merged"
            merge_lora(base, [adapter], merged, dtype="float32", **QUIET)
            cache[key] = dict(base=base, adapter=adapter, merged=merged, ref=peft_reference(base, adapter))
        return cache[key]

    return build


def merged_logits(folder: Path, tied: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) is tied
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float):
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= rel * scale, ((got - want).abs().max().item(), scale)


@pytest.mark.parametrize("name", TIED_FAMILIES)
def test_trained_embedding_and_head_are_both_kept_and_untied(tied, name):
    c = tied(name, ("embed_tokens", "lm_head"))
    ours, base, ref = hf_tensors(c["merged"]), hf_tensors(c["base"]), c["ref"]
    assert HEAD not in base and HEAD in ours  # the base stores one tensor, the merge two
    assert json.loads((c["merged"] / "config.json").read_text())["tie_word_embeddings"] is False
    # each is its own trained module's weight, not the other and not the base's
    assert torch.equal(ours[EMBED], ref["embed"]) and torch.equal(ours[HEAD], ref["head"])
    assert not torch.equal(ref["embed"], ref["head"])
    assert not torch.allclose(ours[EMBED], base[EMBED].float()) and not torch.allclose(ours[HEAD], base[EMBED].float())
    assert_close(merged_logits(c["merged"]), ref["logits"], 1e-4)


@pytest.mark.parametrize("name", TIED_FAMILIES)
def test_trained_embedding_alone_leaves_the_head_on_the_base_embedding(tied, name):
    """PEFT's forward with modules_to_save=[embed_tokens] on a tied model: the input embedding is the
    trained copy, the head still the base's embedding (it is tied to the original module, not to the
    copy). The merge unties so, rather than letting the head follow the trained embedding."""
    c = tied(name, ("embed_tokens",))
    ours, base, ref = hf_tensors(c["merged"]), hf_tensors(c["base"]), c["ref"]
    assert torch.equal(ref["head"], base[EMBED].float())  # PEFT's own forward, as found (peft 0.21)
    assert torch.equal(ours[EMBED], ref["embed"]) and not torch.equal(ours[EMBED], ref["head"])
    assert torch.equal(ours[HEAD], base[EMBED].float())
    assert json.loads((c["merged"] / "config.json").read_text())["tie_word_embeddings"] is False
    assert_close(merged_logits(c["merged"]), ref["logits"], 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIED_FAMILIES)
def test_an_adapter_trained_with_ensure_weight_tying_keeps_the_model_tied(tied, name):
    """PEFT's ensure_weight_tying: one trained copy for the tied pair (PEFT stores it as both
    embed_tokens and lm_head). The merge keeps the model tied, with the trained embedding."""
    from safetensors import safe_open

    c = tied(name, ("embed_tokens",), ensure_weight_tying=True)
    with safe_open(c["adapter"] / "adapter_model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if "lora" not in k}
    assert len(stored) == 2 and torch.equal(*stored.values())  # both stored, equal
    ours, base, ref = hf_tensors(c["merged"]), hf_tensors(c["base"]), c["ref"]
    assert torch.equal(ref["head"], ref["embed"]) and not torch.equal(ref["embed"], base[EMBED].float())
    assert HEAD not in ours and torch.equal(ours[EMBED], ref["embed"])
    assert json.loads((c["merged"] / "config.json").read_text())["tie_word_embeddings"] is True
    assert_close(merged_logits(c["merged"], tied=True), ref["logits"], 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("modules", [("embed_tokens", "lm_head"), ("embed_tokens",)])
@pytest.mark.parametrize("name", TIED_FAMILIES)
def test_gguf_of_the_untied_merge_has_its_own_output_and_peft_logits_in_llama_cpp(tied, name, modules, tmp_path):
    from llamaforge.export import export_gguf

    c = tied(name, modules)
    out = tmp_path / "m.gguf"
    export_gguf(c["merged"], out, "f16", echo=lambda *a: None, modelfile=None)
    _, tensors = read_gguf(out)
    assert "output.weight" in tensors and tensors["output.weight"][0] == "F16"
    ours = hf_tensors(c["merged"])
    # GGUF holds each of the two as its float16 bytes (rows reversed in gguf's shape)
    assert tensors["output.weight"][2] == ours[HEAD].to(torch.float16).numpy().tobytes()
    assert tensors["token_embd.weight"][2] == ours[EMBED].to(torch.float16).numpy().tobytes()
    llm = llama_cpp_model(out, n_ctx=64, logits_all=True, n_threads=1)
    llm.eval(IDS)
    got = torch.tensor(llm.scores[: len(IDS)], dtype=torch.float32)
    assert_close(got, c["ref"]["logits"], 0.02)
    assert (got.argmax(-1) == c["ref"]["logits"].argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("save_embedding_layers", [True, False])
def test_a_lora_on_the_embedding_of_a_tied_base_leaves_the_head_on_the_base_embedding(tmp_path, save_embedding_layers):
    """A LoRA update (not a saved copy) on embed_tokens of a tied base, saved with the embedding's base
    layer (PEFT's default for a targeted embedding) or without: PEFT's forward adds the update to the
    embedding lookup only, the head still reading the base's weight; the merge unties and matches."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from llamaforge.merge import merge_lora

    tok, rows = family_tokenizer("llama32", tmp_path / "tokenizer")
    base = make_family_model(tmp_path / "base", "llama32", tok, rows)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.0,
                     target_modules=["embed_tokens", "q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter", save_embedding_layers=save_embedding_layers)
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                       tmp_path / "adapter").eval()
    with torch.no_grad():
        want = pm(torch.tensor([IDS])).logits[0]
    merge_lora(base, [tmp_path / "adapter"], tmp_path / "merged", dtype="float32", **QUIET)
    ours, b = hf_tensors(tmp_path / "merged"), hf_tensors(base)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(ours[HEAD], b[EMBED].float()) and not torch.allclose(ours[EMBED], b[EMBED].float())
    assert_close(merged_logits(tmp_path / "merged"), want, 1e-4)
