"""The streaming LoRA merge, checked against PEFT on real PEFT adapters."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, baseline_rss, peak_rss, run_script, synthesize
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llamaforge.errors import LlamaforgeError
from llamaforge.merge.run import merge_lora

QUIET = dict(echo=lambda *a: None, progress=False)
PROMPT = torch.tensor([[1, 5, 40, 300, 511, 600, 900, 1100, 2, 7]])


def rows_of(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def peft_chain(base: Path, adapters: list[Path], dtype=torch.float32):
    """What a user gets with PEFT: resize to each adapter's vocabulary, load it, merge it, in order."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), dtype=dtype)
    for ad in adapters:
        with safe_open(str(ad / "adapter_model.safetensors"), "pt") as f:
            emb = [k for k in f.keys() if k.endswith("embed_tokens.weight")]
            if emb:
                model.resize_token_embeddings(f.get_slice(emb[0]).get_shape()[0], mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(ad)).merge_and_unload()
    return model


def load(folder: Path, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype)


def state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_peft_adapter(base: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT adapter (random, non-zero B) on the demo base, with any LoraConfig options."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(str(out))
    return out


# --- agreement with PEFT ----------------------------------------------------------------------


def test_one_adapter_matches_peft_logits_and_merged_weights(demo, tmp_path):
    lora = demo / "lora_llama_plus"
    ours32 = tmp_path / "m32"
    merge_lora(demo / "base", [lora], ours32, dtype="float32", **QUIET)
    ref = peft_chain(demo / "base", [lora])
    with torch.no_grad():
        ref_logits = ref(PROMPT).logits
        our_logits = load(ours32)(PROMPT).logits
    assert (ref_logits - our_logits).abs().max().item() < 1e-4
    # float16 output: every weight equals PEFT's merged float32 weight rounded to float16
    ours16 = tmp_path / "m16"
    merge_lora(demo / "base", [lora], ours16, dtype="float16", **QUIET)
    sd, ref_sd = state(ours16), ref.state_dict()
    assert set(sd) == set(ref_sd)
    for k, v in sd.items():
        assert v.dtype == torch.float16
        diff = (v.float() - ref_sd[k].half().float()).abs().max().item()
        assert diff <= 2 ** -10 * max(1.0, ref_sd[k].abs().max().item()), k
    cfg = json.loads((ours16 / "config.json").read_text())
    assert cfg["vocab_size"] == sd["model.embed_tokens.weight"].shape[0] == 1189
    assert cfg["tie_word_embeddings"] is False


def test_plus_chain_equals_peft_applied_in_order(demo, tmp_path):
    chain = [demo / "lora_llama_plus", demo / "lora_alpaca_plus"]
    out = tmp_path / "m"
    manifest = merge_lora(demo / "base", chain, out, dtype="float32", **QUIET)
    ref = peft_chain(demo / "base", chain)
    with torch.no_grad():
        assert (ref(PROMPT).logits - load(out)(PROMPT).logits).abs().max().item() < 1e-4
    sd, ref_sd = state(out), ref.state_dict()
    assert max((sd[k] - ref_sd[k]).abs().max().item() for k in sd) < 1e-5
    # the last full tensor wins: the Alpaca adapter's embeddings, not the LLaMA-Plus ones
    with safe_open(str(chain[1] / "adapter_model.safetensors"), "pt") as f:
        assert torch.equal(sd["model.embed_tokens.weight"], f.get_tensor("base_model.model.model.embed_tokens.weight").float())
    assert [a["path"] for a in manifest["adapters"]] == [str(p) for p in chain]
    assert manifest["vocab_size"] == rows_of(out) == 1190
    # the tokenizer comes from the last adapter and fits the embeddings
    from llamaforge.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(out)
    assert len(tok) == 1190 and tok.pad_token == "[PAD]"


def test_rslora_and_rank_alpha_patterns_match_peft(demo, tmp_path):
    base = demo / "base"
    rs = make_peft_adapter(base, tmp_path / "rs", 1, use_rslora=True, r=4, lora_alpha=8)
    pat = make_peft_adapter(base, tmp_path / "pat", 2, r=8, lora_alpha=16,
                            rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                            alpha_pattern={"v_proj": 64, "gate_proj": 3})
    for ad in (rs, pat):
        out = tmp_path / f"m-{ad.name}"
        merge_lora(base, [ad], out, tokenizer=base, dtype="float32", **QUIET)
        ref = peft_chain(base, [ad])
        sd, ref_sd = state(out), ref.state_dict()
        assert max((sd[k] - ref_sd[k]).abs().max().item() for k in sd) < 1e-6, ad.name
    cfg = json.loads((pat / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]  # the patterns really were exercised


def test_dora_matches_peft(demo, tmp_path):
    base = demo / "base"
    ad = make_peft_adapter(base, tmp_path / "dora", 3, use_dora=True, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # a magnitude different from the weight norm, so DoRA changes the result
        f = ad / "adapter_model.safetensors"
        sd = load_file(str(f))
        for k in sd:
            if "lora_magnitude_vector" in k:
                sd[k] = sd[k] * 1.5
        save_file(sd, str(f))
    out = tmp_path / "m"
    merge_lora(base, [ad], out, tokenizer=base, dtype="float32", **QUIET)
    ref = peft_chain(base, [ad])
    sd, ref_sd = state(out), ref.state_dict()
    assert max((sd[k] - ref_sd[k]).abs().max().item() for k in sd) < 1e-5


def test_fan_in_fan_out_transposes_the_update(demo, tmp_path):
    """PEFT only uses fan_in_fan_out for Conv1D layers (GPT-2), so build the adapter by hand."""
    base = demo / "base"
    w = state(base)["model.layers.0.self_attn.q_proj.weight"].float()
    out_f, in_f = w.shape
    A, B = torch.randn(4, out_f), torch.randn(in_f, 4)  # (B @ A) is (in, out): stored transposed
    ad = tmp_path / "fifo"
    ad.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": A,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": B},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 2,
                                                        "fan_in_fan_out": True, "target_modules": ["q_proj"]}))
    out = tmp_path / "m"
    merge_lora(base, [ad], out, tokenizer=base, dtype="float32", **QUIET)
    got = state(out)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(got, w + 0.5 * (B @ A).T, atol=1e-6)


def test_dora_on_fan_in_fan_out_layers_is_refused(demo, tmp_path):
    ad = tmp_path / "dora-fifo"
    ad.mkdir()
    k = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{k}.lora_A.weight": torch.zeros(4, 64), f"{k}.lora_B.weight": torch.zeros(64, 4),
               f"{k}.lora_magnitude_vector": torch.ones(64)}, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                        "use_dora": True, "fan_in_fan_out": True}))
    _expect_error(tmp_path, "DoRA with fan_in_fan_out", demo / "base", [ad], tokenizer=demo / "base")


def test_peft_key_variants_give_identical_output(demo, tmp_path):
    """`.default.` segments (a live model's state dict), modules_to_save wrappers, .bin adapters."""
    lora = demo / "lora_llama_plus"
    ref = tmp_path / "ref"
    merge_lora(demo / "base", [lora], ref, **QUIET)
    sd = load_file(str(lora / "adapter_model.safetensors"))
    variants = {
        "default": {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                    .replace("embed_tokens.weight", "embed_tokens.modules_to_save.default.weight")
                    .replace("lm_head.weight", "lm_head.modules_to_save.default.weight"): v for k, v in sd.items()},
        "noprefix": {k.replace("base_model.model.", "", 1): v for k, v in sd.items()},
    }
    for name, variant in variants.items():
        ad = tmp_path / name
        shutil.copytree(lora, ad)
        (ad / "adapter_model.safetensors").unlink()
        if name == "noprefix":
            torch.save(variant, ad / "adapter_model.bin")
        else:
            save_file(variant, str(ad / "adapter_model.safetensors"))
        out = tmp_path / f"m-{name}"
        merge_lora(demo / "base", [ad], out, **QUIET)
        assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes(), name


# --- inputs and outputs -----------------------------------------------------------------------


def test_bin_base_and_safetensors_base_give_byte_identical_output(demo, tmp_path):
    sd = state(demo / "base")
    single = tmp_path / "bin1"
    sharded = tmp_path / "bin2"
    for d in (single, sharded):
        d.mkdir()
        for f in ("config.json", "generation_config.json", "tokenizer.model"):
            shutil.copy(demo / "base" / f, d / f)
    torch.save(sd, single / "pytorch_model.bin")
    names = sorted(sd)
    half = len(names) // 2
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for fname, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, sharded / fname)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    chain = [demo / "lora_llama_plus", demo / "lora_alpaca_plus"]
    outs = []
    for base in (demo / "base", single, sharded):
        out = tmp_path / f"out-{base.name}"
        merge_lora(base, chain, out, max_shard_size="200KB", **QUIET)
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
    assert len(outs[0]) >= 2
    assert outs[0] == outs[1] == outs[2]


def test_output_folder_is_complete_deterministic_and_described(demo, tmp_path):
    chain = [demo / "lora_llama_plus", demo / "lora_alpaca_plus"]
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run_script("merge_lora.py", "--base", demo / "base", "--lora", chain[0], "--lora", chain[1],
                   "--output", out, "--max-shard-size", "3MB", check=True)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for s in shards:
        assert (a / s).read_bytes() == (b / s).read_bytes()
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for f in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "llamaforge.json"):
        assert (a / f).is_file(), f
    manifest = json.loads((a / "llamaforge.json").read_text())
    import hashlib

    for name, digest in manifest["outputs_sha256"].items():
        assert hashlib.sha256((a / name).read_bytes()).hexdigest() == digest, name
    assert set(manifest["outputs_sha256"]) >= set(shards) | {"config.json", "tokenizer.model"}
    assert manifest["inputs_sha256"][str(chain[1] / "adapter_model.safetensors")] == hashlib.sha256(
        (chain[1] / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert [x["config"]["r"] for x in manifest["adapters"]] == [8, 8]
    assert {"torch", "safetensors", "llamaforge"} <= set(manifest["versions"])
    # a transformers-independent reader agrees on the format
    assert sum(len(safe_open(str(a / s), "pt").keys()) for s in shards) == len(index["weight_map"])


def test_transformers4_era_tokenizer_folder_gets_fast_files(demo, tmp_path):
    """Real Chinese LoRA folders hold tokenizer.model + special_tokens_map.json, no tokenizer.json."""
    ad = tmp_path / "alpaca"
    shutil.copytree(demo / "lora_alpaca_plus", ad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ad / f).unlink()
    out = tmp_path / "m"
    merge_lora(demo / "base", [demo / "lora_llama_plus", ad], out, **QUIET)
    from llamaforge.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(out)
    assert len(tok) == 1190 and tok.pad_token == "[PAD]" and tok.pad_token_id == 1189
    assert tok("白日依山尽").input_ids == load_hf_tokenizer(demo / "lora_alpaca_plus")("白日依山尽").input_ids


def test_tied_base_stays_tied_when_no_adapter_touches_the_head(demo, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((demo / "base/config.json").read_text())
    cfg["tie_word_embeddings"] = True
    torch.manual_seed(0)
    base = tmp_path / "tied"
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "dtype")})) \
        .save_pretrained(str(base))
    shutil.copy(demo / "base/tokenizer.model", base / "tokenizer.model")
    assert "lm_head.weight" not in state(base)
    ad = make_peft_adapter(base, tmp_path / "ad", 4, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "m"
    merge_lora(base, [ad], out, tokenizer=base, dtype="float32", **QUIET)
    assert "lm_head.weight" not in state(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    ref = peft_chain(base, [ad])
    with torch.no_grad():
        assert (ref(PROMPT[:, :5]).logits - load(out)(PROMPT[:, :5]).logits).abs().max().item() < 1e-4


@pytest.mark.slow
def test_peak_memory_stays_flat_as_the_model_grows(tmp_path):
    """Merging a base 8x larger must not need 8x the memory (streaming, not loading)."""
    peaks = []
    for layers in (2, 16):
        work = tmp_path / f"L{layers}"
        synthesize(work, 8000, 9000, 8, hidden=1024, intermediate=2816, layers=layers, heads=8, kv_heads=8)
        rss = peak_rss([sys.executable, REPO / "scripts/merge_lora.py", "--base", work / "base",
                        "--lora", work / "lora", "--output", work / "out", "--no-progress"])
        size = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors"))
        peaks.append((size, rss))
    (small, rss_small), (large, rss_large) = peaks
    floor = baseline_rss("click", "tqdm", "llamaforge.cli", "llamaforge.merge")
    assert large > 5 * small
    assert rss_large - rss_small < 0.1 * (large - small), peaks
    # above the interpreter with the same imports: less than a quarter of the model itself
    assert rss_large - floor < 0.25 * large, (peaks, floor)


# --- bad input: one clear error, no output folder ---------------------------------------------


def _expect_error(tmp_path, match, base, loras, **kw):
    out = tmp_path / "out"
    with pytest.raises(LlamaforgeError, match=match) as e:
        merge_lora(base, loras, out, **QUIET, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "Fix:" in msg
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return msg


def _adapter_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    f.unlink()
    save_file(sd, str(f))
    return dst


def test_adapter_keys_matching_no_base_tensor_are_listed(demo, tmp_path):
    ad = _adapter_copy(demo / "lora_llama_plus", tmp_path / "ad", lambda sd: sd.update({
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8)}))
    msg = _expect_error(tmp_path, "match no tensor of the base", demo / "base", [ad])
    assert "layers.9.self_attn.q_proj.lora_A.weight" in msg and str(ad / "adapter_model.safetensors") in msg


def test_shape_mismatch_is_refused(demo, tmp_path):
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    ad = _adapter_copy(demo / "lora_llama_plus", tmp_path / "ad", lambda sd: sd.update({key: torch.zeros(8, 100)}))
    _expect_error(tmp_path, "shape", demo / "base", [ad])


def test_empty_zero3_tensor_is_refused(demo, tmp_path):
    key = "base_model.model.model.embed_tokens.weight"
    ad = _adapter_copy(demo / "lora_llama_plus", tmp_path / "ad", lambda sd: sd.update({key: torch.zeros(0)}))
    _expect_error(tmp_path, "empty.*ZeRO-3", demo / "base", [ad])


def test_nan_in_a_result_is_refused(demo, tmp_path):
    def poison(sd):
        sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][3, 2] = float("nan")
    ad = _adapter_copy(demo / "lora_llama_plus", tmp_path / "ad", poison)
    msg = _expect_error(tmp_path, "NaN or Inf in model.layers.1.self_attn.v_proj.weight", demo / "base", [ad])
    assert str(ad) in msg


def test_float16_overflow_is_refused(demo, tmp_path):
    def huge(sd):
        sd["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"][0, 0] = 60000.0
        sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"][0, 0] = 1000.0  # 4 * 6e7: beyond float16
    ad = _adapter_copy(demo / "lora_llama_plus", tmp_path / "ad", huge)
    _expect_error(tmp_path, "NaN or Inf", demo / "base", [ad])


def test_vocabulary_shrinking_along_the_list_is_refused(demo, tmp_path):
    msg = _expect_error(tmp_path, "shrink from 1190 to 1189", demo / "base",
                        [demo / "lora_alpaca_plus", demo / "lora_llama_plus"])
    assert "49953" in msg


def test_tokenizer_larger_than_base_without_full_embeddings_explains_the_vocabularies(demo, tmp_path):
    ad = _adapter_copy(demo / "lora_llama_plus", tmp_path / "ad", lambda sd: [
        sd.pop(k) for k in list(sd) if k.endswith(("embed_tokens.weight", "lm_head.weight"))])
    msg = _expect_error(tmp_path, "no adapter stores full embeddings", demo / "base", [ad])
    assert "32000" in msg and "49953" in msg and "49954" in msg


def test_tokenizer_that_does_not_fit_the_merged_embeddings_is_refused(demo, tmp_path):
    _expect_error(tmp_path, "tokenizer has 1189 tokens but the model has 1190 embedding rows after its adapters", demo / "base",
                  [demo / "lora_llama_plus", demo / "lora_alpaca_plus"], tokenizer=demo / "lora_llama_plus")


def test_missing_files_are_named(demo, tmp_path):
    ad = tmp_path / "ad"
    shutil.copytree(demo / "lora_llama_plus", ad)
    (ad / "adapter_model.safetensors").unlink()
    _expect_error(tmp_path, "no adapter_model.safetensors or adapter_model.bin", demo / "base", [ad])
    _expect_error(tmp_path, "adapter folder not found", demo / "base", [tmp_path / "nope"])
    base = tmp_path / "base"
    shutil.copytree(demo / "base", base)
    (base / "model-00002-of-00002.safetensors").unlink()
    _expect_error(tmp_path, "shard model-00002-of-00002.safetensors .* is missing", base, [demo / "lora_llama_plus"])


def test_corrupt_safetensors_is_refused(demo, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(demo / "base", base)
    f = base / "model-00001-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    msg = _expect_error(tmp_path, "ends at byte [0-9]+ but the file has [0-9]+ data bytes", base, [demo / "lora_llama_plus"])
    assert str(f) in msg


def test_meta_folder_as_base_points_to_the_import(demo, tmp_path):
    meta = tmp_path / "7B"
    meta.mkdir()
    (meta / "consolidated.00.pth").write_bytes(b"")
    (meta / "params.json").write_text("{}")
    _expect_error(tmp_path, "Meta checkpoint", meta, [])


def test_cli_error_is_one_line_and_leaves_no_output(demo, tmp_path):
    out = tmp_path / "out"
    proc = run_script("merge_lora.py", "--base", demo / "base", "--lora", demo / "lora_alpaca_plus",
                      "--lora", demo / "lora_llama_plus", "--output", out)
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("llamaforge: error: ") and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("dora", [False, True])
def test_lora_arithmetic_on_one_block_of_rows_equals_peft(dora):
    """lora.apply_factors on rows 8..24 of a weight equals those rows of PEFT's own merge of the
    whole layer (LoRA, and DoRA's per-row magnitude), in float32."""
    from peft import LoraConfig, get_peft_model

    from llamaforge.merge.lora import Factors, apply_factors

    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(64, 48, bias=False)

    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=dora,
                                              init_lora_weights=False))
    layer = model.base_model.model.q_proj
    w0 = layer.base_layer.weight.detach().clone()
    factors = [Factors(layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach(), 8 / 4,
                       layer.lora_magnitude_vector["default"].weight.detach().reshape(-1) if dora else None)]
    block = w0[8:24].clone()
    apply_factors(block, 8, factors)
    layer.merge()
    merged = layer.base_layer.weight.detach()
    assert (merged[8:24] - block).abs().max().item() < 1e-6
    assert (block - w0[8:24]).abs().max().item() > 1e-3  # the update is not a no-op


def test_an_adapter_already_in_a_merged_base_is_refused(demo, tmp_path):
    """A merged folder given again as the base with an adapter its llamaforge.json lists (the same
    folder or a copy of it) is refused, where applying it again would add its update twice; another
    adapter on that merged base (Chinese-Alpaca-Plus's second step) still merges."""
    plus, alpaca = demo / "lora_llama_plus", demo / "lora_alpaca_plus"
    merged = tmp_path / "merged-plus"
    merge_lora(demo / "base", [plus], merged, **QUIET)
    copy = tmp_path / "copy-of-plus"
    shutil.copytree(plus, copy)
    for again in (plus, copy):
        msg = _expect_error(tmp_path, "already merged into the base", merged, [again])
        assert msg.startswith(f"{again}: ") and str(merged) in msg and "twice" in msg
    msg = _expect_error(tmp_path, "already merged into the base", merged, [alpaca, plus])
    assert msg.startswith(f"{plus}: ")
    proc = run_script("merge_lora.py", "--base", merged, "--lora", plus, "--output", tmp_path / "cli")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llamaforge: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr and "Fix:" in errors[0]
    assert not (tmp_path / "cli").exists()
    manifest = merge_lora(merged, [alpaca], tmp_path / "two-steps", **QUIET)
    assert [a["path"] for a in manifest["adapters"]] == [str(alpaca)]
    with safe_open(str(tmp_path / "two-steps" / "model.safetensors"), "pt") as f, \
            safe_open(str(merged / "model.safetensors"), "pt") as g:
        assert not torch.equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight"),
                               g.get_tensor("model.layers.0.self_attn.q_proj.weight"))
