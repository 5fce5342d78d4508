"""Today's families end to end (issue 12): Llama-3.1 (tokenizer.json only, GQA, llama3 rope
scaling), Llama-3.2 (tied embeddings), Qwen2 (q/k/v biases, tied embeddings) and Mistral
(SentencePiece, GQA) — merged against PEFT, generated from, and exported to GGUF against llama.cpp's
own converter and loader."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from families import (
    FAMILIES, convert_hf_to_gguf, family_tokenizer, llama_cpp_model, make_family_model, make_lora, read_gguf,
)
from helpers import hf_tensors, peft_merge, run_script

from llamaforge.generate import GenerationSettings, Generator, bind_template, get_template, load_model


# Issue 22's families run end to end in the slow tier (the fast tier's budget: each builds a model, a
# LoRA and two merges); the fast tier checks their table entries, refusals and prompt formats without weights.
SLOW_FAMILIES = ("qwen3", "gemma3", "phi3")


def tiered(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n for n in names]


@pytest.fixture(scope="session")
def family(request, tmp_path_factory):
    """{family: dict(tokenizer, base, lora, merged, peft)} built once per session, per family."""
    cache = {}

    def build(name: str) -> dict:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            tok, rows = family_tokenizer(name, root / "tokenizer")
            base = make_family_model(root / "base", name, tok, rows)
            lora = make_lora(base, root / "lora")
            merged = root / "merged"
            run_script("merge_lora.py", "--base", base, "--lora", lora, "--output", merged, check=True)
            ref = peft_merge(base, [lora], tok, root / "peft", dtype=torch.float16)
            cache[name] = dict(tokenizer=tok, base=base, lora=lora, merged=merged, peft=ref, rows=rows)
        return cache[name]

    return build


@pytest.mark.parametrize("name", tiered(FAMILIES))
def test_merge_equals_peft_and_keeps_the_tokenizer_byte_for_byte(family, name):
    f = family(name)
    ours, ref = hf_tensors(f["merged"]), hf_tensors(f["peft"])
    assert sorted(ours) == sorted(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], ref[k])]
    base = hf_tensors(f["base"])
    assert any(not torch.equal(ours[k], base[k]) for k in ours if "proj" in k)  # the adapter did change weights
    if name == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours and "lm_head.weight" not in ours
    if name == "qwen3":  # q/k norms of head_dim 32 (from config.json: hidden / heads is 16), no biases, tied
        assert ours["model.layers.1.self_attn.k_norm.weight"].shape == (32,) and "lm_head.weight" not in ours
        assert not any(k.endswith(".bias") for k in ours)
    if name == "phi3":  # the adapter targets the fused projections, which stay fused
        assert "model.layers.0.self_attn.qkv_proj.weight" in ours and "model.layers.0.mlp.gate_up_proj.weight" in ours
        assert not any(".q_proj." in k or ".gate_proj." in k for k in ours) and "lm_head.weight" in ours
    if name == "gemma3":  # sandwich norms and q/k norms, tied
        assert "model.layers.5.post_feedforward_layernorm.weight" in ours and "lm_head.weight" not in ours
        assert ours["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    cfg = json.loads((f["merged"] / "config.json").read_text())
    base_cfg = json.loads((f["base"] / "config.json").read_text())
    assert cfg["architectures"] == base_cfg["architectures"]
    assert cfg.get("rope_parameters") == base_cfg.get("rope_parameters")
    assert cfg["tie_word_embeddings"] == base_cfg["tie_word_embeddings"]
    for src in f["tokenizer"].iterdir():  # every tokenizer file, chat template included, byte for byte
        assert (f["merged"] / src.name).read_bytes() == src.read_bytes(), src.name


def test_tokenizer_json_tokenizers_take_added_tokens(family, tmp_path):
    f = family("qwen2")
    out = tmp_path / "tok"
    proc = run_script("merge_tokenizers.py", "--base", f["tokenizer"], "--add-token", "<|my_pad|>", "--output", out,
                      check=True)
    assert "with id 151646" in proc.stdout
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(f["tokenizer"])
    assert len(tok) == len(ref) + 1 and tok.convert_tokens_to_ids("<|my_pad|>") == 151646
    assert tok("a <|my_pad|> b").input_ids == ref("a ").input_ids + [151646] + ref(" b").input_ids
    assert tok.chat_template == ref.chat_template
    again = run_script("merge_tokenizers.py", "--base", f["tokenizer"], "--add-token", "<|im_end|>", "--output",
                       tmp_path / "dup")
    assert again.returncode == 1 and "already a token" in again.stderr and not (tmp_path / "dup").exists()


def test_unsupported_architecture_gets_one_line(family, tmp_path):
    f = family("mistral")
    base = tmp_path / "gpt2"
    shutil.copytree(f["base"], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (base / "config.json").write_text(json.dumps(cfg))
    for script, args in (("merge_lora.py", ["--base", base, "--output", tmp_path / "out"]),
                         ("export_gguf.py", ["--model", base, "--output", tmp_path / "out.gguf"])):
        proc = run_script(script, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert "GPT2LMHeadModel" in lines[0] and "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in lines[0]
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_gemma3_multimodal_checkpoint_is_refused_in_one_line(tmp_path):
    """Gemma3ForConditionalGeneration (vision tower + language model) is refused by its config.json, not
    half-exported."""
    base = tmp_path / "gemma3-mm"
    base.mkdir()
    text = new_family_configs()["gemma3"]
    (base / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                  "model_type": "gemma3", "text_config": text}))
    for script, args in (("merge_lora.py", ["--base", base, "--output", tmp_path / "out"]),
                         ("export_gguf.py", ["--model", base, "--output", tmp_path / "out.gguf"])):
        proc = run_script(script, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert "Gemma3ForConditionalGeneration" in lines[0] and "multimodal" in lines[0] and "Fix:" in lines[0]
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


def new_family_configs() -> dict[str, dict]:
    """config.json of the test models of issue 22's families (as save_pretrained writes them)."""
    from families import family_config

    out = {}
    for name in SLOW_FAMILIES:
        cfg = family_config(name, {"qwen3": 151936, "gemma3": 32000, "phi3": 32064}[name])
        d = cfg.to_dict()
        d["architectures"] = [{"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                               "phi3": "Phi3ForCausalLM"}[name]]
        out[name] = d
    return out


def test_new_families_are_table_entries_with_their_shapes_and_gguf_names():
    """Qwen3, Gemma-3 and Phi-3 from their config.json alone: the family, head_dim from config.json,
    the per-role shapes (q/k norms, fused qkv and gate_up), the GGUF names, Gemma's norm offsets."""
    from llamaforge.model import dims_from_config
    from llamaforge.model.families import FAMILIES as TABLE
    from llamaforge.model.families import family_of

    cfgs = new_family_configs()
    got = {}
    for name, cfg in cfgs.items():
        fam = family_of(cfg, "config.json")
        d = dims_from_config(cfg, "config.json")
        got[name] = (fam.gguf_arch, d.hd, {t.gguf: (d.shape_of(t), t.offset) for t in fam.hf_order(1, with_output=False)})
    assert got["qwen3"][:2] == ("qwen3", 32) and got["qwen3"][2]["blk.0.attn_q_norm.weight"] == ((32,), 0.0)
    assert got["qwen3"][2]["blk.0.attn_q.weight"] == ((128, 64), 0.0) and "blk.0.attn_q.bias" not in got["qwen3"][2]
    g = got["gemma3"][2]
    assert got["gemma3"][:2] == ("gemma3", 32) and g["blk.0.attn_k_norm.weight"] == ((32,), 1.0)
    assert {k for k, (_, off) in g.items() if off} == {
        "blk.0.attn_norm.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight",
        "blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight",
        "output_norm.weight"}  # every RMSNorm, and nothing else
    p = got["phi3"][2]
    assert got["phi3"][:2] == ("phi3", 16) and p["blk.0.attn_qkv.weight"] == (((4 + 2 * 2) * 16, 64), 0.0)
    assert p["blk.0.ffn_up.weight"] == ((256, 64), 0.0) and "blk.0.ffn_gate.weight" not in p
    assert not any(TABLE[n].meta for n in ("qwen3", "gemma3_text", "phi3"))


@pytest.mark.parametrize("name", SLOW_FAMILIES)
def test_new_families_have_no_meta_format_by_config_alone(name, tmp_path):
    """Meta's consolidated.NN.pth exists for LLaMA alone: one line, from config.json, nothing written."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(new_family_configs()[name]))
    proc = run_script("export_pth.py", "--model", model, "--output", tmp_path / "meta")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "no Meta consolidated.NN.pth format" in lines[0], proc.stderr
    assert not (tmp_path / "meta").exists()


def test_new_families_chat_templates_give_their_modelfile_formats():
    """Each family's real chat template picks its own Modelfile format: Qwen3 ChatML, Gemma-3 gemma,
    Phi-3.5 phi3 (the Go TEMPLATE and stops in Ollama's form)."""
    from families import GEMMA3_CHAT_TEMPLATE, llama_cpp_tree

    from llamaforge.export.modelfile import modelfile_text
    from llamaforge.model.prompts import prompt_format

    templates = llama_cpp_tree() / "models" / "templates"
    qwen3 = (templates / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    phi = (templates / "microsoft-Phi-3.5-mini-instruct.jinja").read_text(encoding="utf-8")
    assert [prompt_format(t) for t in (qwen3, GEMMA3_CHAT_TEMPLATE, phi)] == ["chatml", "gemma", "phi3"]
    gemma = modelfile_text("m.gguf", GEMMA3_CHAT_TEMPLATE, {})
    assert "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n" in gemma
    assert 'PARAMETER stop "<end_of_turn>"' in gemma
    phi3 = modelfile_text("m.gguf", phi, {})
    assert "<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>" in phi3
    assert 'PARAMETER stop "<|end|>"' in phi3


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_FAMILIES)
def test_q8_0_and_k_quants_from_the_f16_run_in_llama_cpp(family, family_gguf, name, tmp_path):
    """Q8_0 (written here) and Q4_K_M (llama.cpp's quantizer on our F16, --from-f16) of each new family
    load in llama.cpp and follow the Hugging Face logits (cosine per position; the random test models'
    rows of 64 fall back to Q5_0/Q8_0 in K-quants, and Gemma's 1 + w norms amplify the rounding)."""
    from transformers import AutoModelForCausalLM

    f = family(name)
    f16, _ = family_gguf(name, "f16")
    q8, _ = family_gguf(name, "q8_0")
    q4 = tmp_path / f"{name}-q4_k_m.gguf"
    run_script("export_gguf.py", "--model", f["merged"], "--output", q4, "--outtype", "q4_k_m", "--from-f16", f16,
               check=True)
    assert read_gguf(q4)[0]["general.architecture"] == GGUF_ARCH[name]
    ids = [5, 17, 300, 1000, 42, 7, 99, 2500, 31, 12]
    model = AutoModelForCausalLM.from_pretrained(f["merged"], dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    for path, floor in ((q8, 0.98), (q4, 0.7)):
        llm = llama_cpp_model(path, n_ctx=64, logits_all=True, n_threads=2)
        llm.eval(ids)
        got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
        assert cos > floor, (path.name, cos)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3", "phi3"])
def test_sentencepiece_ggufs_tokenize_as_hf_in_llama_cpp(family, family_gguf, name):
    """Phi-3: llama.cpp's phi-3 test vectors, exactly, in llama.cpp (our GGUF) and Hugging Face, and its
    chat tokens as single ids. Gemma-3's SentencePiece without a space prefix: llama.cpp and Hugging
    Face give the same ids on llama.cpp's SentencePiece test texts (the LLaMA model those vectors are
    for adds a prefix: its ids differ)."""
    from transformers import AutoTokenizer

    from families import vocab_tests

    f = family(name)
    llm = llama_cpp_model(family_gguf(name, "f16")[0], vocab_only=True)
    tok = AutoTokenizer.from_pretrained(f["merged"])
    cases = vocab_tests("phi-3" if name == "phi3" else "llama-spm")
    texts = [t for t, _ in cases]
    ours = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    assert ours == [tok.encode(t, add_special_tokens=False) for t in texts]
    if name == "phi3":
        assert len(cases) >= 40 and ours == [i for _, i in cases]
        assert llm.tokenize(b"<|user|>\nHi<|end|>", add_bos=False, special=True)[0] == 32010
        assert tok.encode("<|user|>\nHi<|end|>", add_special_tokens=False)[0] == 32010
    else:
        assert ours[texts.index("Hello world")] == [10994, 3186]  # "Hello", not "▁Hello": no prefix
    assert llm.tokenize(b"Hi", add_bos=True)[0] == tok("Hi").input_ids[0] == 1


@pytest.mark.parametrize("name", tiered(FAMILIES))
def test_greedy_batched_equals_one_at_a_time_with_the_chat_template(family, name):
    f = family(name)
    loaded = load_model(f["merged"], echo=lambda *a: None, device="cpu", dtype="float32")
    tpl = bind_template(get_template("auto"), loaded.tokenizer)
    if name == "mistral":
        assert tpl.name == "alpaca"  # no chat template: the Chinese-Alpaca recipe's
    else:
        assert tpl.name == "chat" and tpl.special_in_text
    gen = Generator(loaded, GenerationSettings(do_sample=False, max_new_tokens=6, repetition_penalty=1.1))
    gen.add_special = not tpl.special_in_text
    prompts = [tpl.prompt(q) for q in ("Hi", "What is the capital of France?", "写一首诗", "1 2 3 4 5 6 7 8 9")]
    ids = gen.encode(prompts[0])
    if name.startswith("llama3"):
        assert ids[0] == 128000 and ids.count(128000) == 1  # BOS once: from the template, not added again
    batched = gen.generate(prompts, batch_size=4)
    single = [gen.generate([p], batch_size=1)[0] for p in prompts]
    assert [g.ids for g in batched] == [g.ids for g in single]
    assert all(len(g.ids) > 0 for g in batched)


# --- GGUF: against llama.cpp's converter, loaded by llama.cpp ---------------------------------

# Keys where llamaforge's GGUF may differ from convert_hf_to_gguf.py's, and why: general.* that the
# converter guesses from the folder name, README and generation_config.json (name, basename, size
# label, finetune, sampling defaults) -- llamaforge names the model after its folder or --name; and
# llamaforge's own key, by which it knows the file as its output. And tokenizer.chat_template where
# the tokenizer has none: llamaforge writes the Alpaca template its inference uses (--template auto).
SENTENCEPIECE = ("mistral", "gemma3", "phi3")  # tokenizer.model families (the rest: byte-level BPE)
GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}  # else llama
ALLOWED_METADATA_DIFFERENCES = re.compile(r"^(general\.(name|basename|size_label|finetune|version|sampling\..*)"
                                          r"|llamaforge\.version)$")


@pytest.fixture(scope="session")
def family_gguf(family, tmp_path_factory):
    """(llamaforge's GGUF, llama.cpp converter's GGUF or None) of a family's merge; the converter (a
    subprocess, seconds to a minute per file) runs only for the tests that compare with it (slow tier)."""
    cache = {}

    def build(name: str, outtype: str, converter: bool = False) -> tuple[Path, Path | None]:
        if (name, outtype) not in cache:
            f = family(name)
            root = tmp_path_factory.mktemp(f"gguf-{name}-{outtype}")
            ours = root / "ours.gguf"
            run_script("export_gguf.py", "--model", f["merged"], "--output", ours, "--outtype", outtype, check=True)
            cache[name, outtype] = [ours, None]
        entry = cache[name, outtype]
        if converter and entry[1] is None:
            entry[1] = convert_hf_to_gguf(family(name)["merged"], entry[0].with_name("ref.gguf"), outtype)
        return tuple(entry)

    return build


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("name", tiered(FAMILIES))
def test_gguf_equals_llama_cpp_converter(family, family_gguf, name, outtype):
    ours, ref = family_gguf(name, outtype, converter=True)
    meta, tensors = read_gguf(ours)
    ref_meta, ref_tensors = read_gguf(ref)
    assert sorted(tensors) == sorted(ref_tensors)
    assert [k for k in tensors if tensors[k] != ref_tensors[k]] == []  # type, shape and bytes of every tensor
    differing = sorted(k for k in set(meta) | set(ref_meta) if meta.get(k) != ref_meta.get(k))
    assert [k for k in differing if not ALLOWED_METADATA_DIFFERENCES.match(k)
            and not (k == "tokenizer.chat_template" and k not in ref_meta)] == []
    if name == "mistral":  # no chat template of its own: the Alpaca one, as --template auto uses
        from llamaforge.model.prompts import ALPACA_CHAT_TEMPLATE

        assert meta["tokenizer.chat_template"] == ALPACA_CHAT_TEMPLATE
    assert meta["general.architecture"] == GGUF_ARCH.get(name, "llama")
    assert meta["tokenizer.ggml.model"] == ("llama" if name in SENTENCEPIECE else "gpt2")
    assert meta.get("tokenizer.ggml.pre") == {"llama3": "llama-bpe", "llama32": "llama-bpe", "qwen2": "qwen2",
                                              "mistral": "default", "qwen3": "qwen2", "gemma3": "default",
                                              "phi3": "default"}[name]
    assert ("rope_freqs.weight" in tensors) == name.startswith("llama3")
    assert ("output.weight" in tensors) == (name in ("llama3", "mistral", "phi3"))
    if name == "qwen2":
        assert tensors["blk.0.attn_q.bias"][0] == "F32"
    if name == "qwen3":
        assert tensors["blk.1.attn_k_norm.weight"][:2] == ("F32", (32,)) and tensors["blk.0.attn_q.weight"][1] == (64, 128)
        assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == [32]
        assert "<think>" in meta["tokenizer.chat_template"]
    if name not in SENTENCEPIECE:
        assert "tokenizer.chat_template" in meta and "tokenizer.ggml.merges" in meta
    if name == "gemma3":  # every norm written as 1 + w (w as stored, in float16, then float32), no space prefix,
        # the full-attention layers' rope base and the sliding ones'
        import numpy as np

        hf = hf_tensors(family(name)["merged"])
        for k, t in (("model.layers.3.pre_feedforward_layernorm.weight", "blk.3.ffn_norm.weight"),
                     ("model.layers.0.self_attn.k_norm.weight", "blk.0.attn_k_norm.weight"),
                     ("model.norm.weight", "output_norm.weight")):
            want = (hf[k] + 1).float().numpy()
            assert tensors[t][0] == "F32" and np.array_equal(np.frombuffer(tensors[t][2], np.float32), want), t
        assert meta["tokenizer.ggml.add_space_prefix"] == [False] and meta["gemma3.attention.sliding_window"] == [4]
        assert meta["gemma3.rope.freq_base"] == [1000000.0] and meta["gemma3.rope.freq_base_swa"] == [10000.0]
        assert "<start_of_turn>" in meta["tokenizer.chat_template"]
    if name == "phi3":  # fused tensors as they are; longrope as factor tensors and an attention factor
        import math

        import numpy as np

        assert tensors["blk.0.attn_qkv.weight"][1] == (64, 128) and tensors["blk.1.ffn_up.weight"][1] == (64, 256)
        cfg = json.loads((family(name)["merged"] / "config.json").read_text())
        long = np.frombuffer(tensors["rope_factors_long.weight"][2], np.float32)
        assert tensors["rope_factors_short.weight"][:2] == ("F32", (6,))
        assert long.tolist() == cfg["rope_parameters"]["long_factor"]
        assert meta["phi3.rope.dimension_count"] == [12] and meta["phi3.attention.sliding_window"] == [0]
        assert meta["phi3.rope.scaling.original_context_length"] == [4096]
        assert abs(meta["phi3.rope.scaling.attn_factor"][0] - math.sqrt(1 + math.log(32) / math.log(4096))) < 1e-6
        assert meta["tokenizer.ggml.token_type"][32010] == [3] and meta["tokenizer.ggml.tokens"][32007] == "<|end|>"
        assert meta["tokenizer.ggml.eos_token_id"] == [32000] and "<|assistant|>" in meta["tokenizer.chat_template"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3", "phi3"])
def test_bf16_gguf_of_the_new_families_equals_llama_cpp_converter(family, family_gguf, name):
    """BF16 (issue 22's third GGUF type) tensor for tensor as convert_hf_to_gguf.py --outtype bf16
    writes it (Qwen3's matrices take the same path as these; its 152k vocabulary costs a minute)."""
    ours, ref = family_gguf(name, "bf16", converter=True)
    meta, tensors = read_gguf(ours)
    ref_meta, ref_tensors = read_gguf(ref)
    assert sorted(tensors) == sorted(ref_tensors)
    assert [k for k in tensors if tensors[k] != ref_tensors[k]] == []
    assert {t[0] for t in tensors.values()} == {"BF16", "F32"}  # matrices BF16, norms and factors F32
    assert tensors["token_embd.weight"][0] == "BF16"
    differing = sorted(k for k in set(meta) | set(ref_meta) if meta.get(k) != ref_meta.get(k))
    assert [k for k in differing if not ALLOWED_METADATA_DIFFERENCES.match(k)] == []
    assert meta["general.file_type"] == [32]  # LLAMA_FTYPE_MOSTLY_BF16


def test_pre_tokenizer_of_an_unknown_tokenizer_is_an_error(family, tmp_path):
    """A tokenizer whose pre-tokenizer llama.cpp does not know is refused, never written as a default:
    Llama-3's without its BOS post-processor (llama.cpp would take it for smaug-bpe)... and one with a
    changed pre-tokenizer regex, whose hash is in no table."""
    f = family("llama3")
    model = tmp_path / "m"
    shutil.copytree(f["merged"], model)
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    proc = run_script("export_gguf.py", "--model", model, "--output", tmp_path / "x.gguf")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "pre-tokenizer" in lines[0] and "Fix:" in lines[0]
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("name", tiered(FAMILIES))
def test_llama_cpp_loads_the_gguf_with_the_logits_of_the_hf_model(family, family_gguf, name):
    """llama.cpp runs our F16 GGUF and gets the merged Hugging Face model's logits (float32 forward)."""
    from transformers import AutoModelForCausalLM

    f = family(name)
    ours, _ = family_gguf(name, "f16")
    ids = [5, 17, 300, 1000, 42, 7, 99, 2500, 31, 12]
    llm = llama_cpp_model(ours, n_ctx=64, logits_all=True, n_threads=2)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(f["merged"], dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    assert got.shape == want.shape
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 0.02 * scale, ((got - want).abs().max().item(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("name", tiered(["llama3", "qwen2", "qwen3"]))
def test_bpe_ggufs_tokenize_llama_cpp_test_vectors_in_llama_cpp_and_hf(family, family_gguf, name):
    from transformers import AutoTokenizer

    from families import vocab_tests

    f = family(name)
    cases = vocab_tests("llama-bpe" if name == "llama3" else "qwen2")  # Qwen3 keeps Qwen2's vocabulary
    assert len(cases) >= 46
    llm = llama_cpp_model(family_gguf(name, "f16")[0], vocab_only=True)
    tok = AutoTokenizer.from_pretrained(f["merged"])
    assert [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t, _ in cases] == [i for _, i in cases]
    assert [tok.encode(t, add_special_tokens=False) for t, _ in cases] == [i for _, i in cases]
    # and the BOS rule: Llama-3 adds <|begin_of_text|>, Qwen2 nothing, in both
    first = llm.tokenize(b"Hello", add_bos=True)[0]
    assert first == (128000 if name == "llama3" else tok.encode("Hello")[0])
    assert tok("Hello").input_ids[0] == first


@pytest.mark.slow
def test_a_real_model_answers_a_real_question_after_merge_and_gguf(tmp_path):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, tied, tokenizer.json BPE, ChatML): merged with a LoRA
    whose update is zero, then asked "What is the capital of France?" through llamaforge's inference
    (--template auto: its chat template) and, as a Q8_0 GGUF, through llama.cpp's chat mode."""
    from families import smollm2

    base = smollm2()
    lora = make_lora(base, tmp_path / "lora", rank=2)
    from safetensors.torch import load_file, save_file

    w = load_file(lora / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in w.items()},
              lora / "adapter_model.safetensors")  # a real adapter file that changes nothing
    merged = tmp_path / "merged"
    run_script("merge_lora.py", "--base", base, "--lora", lora, "--output", merged, check=True)
    (tmp_path / "q.json").write_text(json.dumps([{"instruction": "What is the capital of France?"}]))
    run_script("inference.py", "--model", merged, "--data-file", tmp_path / "q.json", "--predictions-file",
               tmp_path / "pred" / "p.json", "--greedy", "--max-new-tokens", "16", check=True)
    pred = json.loads((tmp_path / "pred" / "p.json").read_text())[0]
    assert "<|im_start|>user" in pred["prompt"] and "Paris" in pred["output"], pred
    gguf_path = tmp_path / "smol.gguf"
    run_script("export_gguf.py", "--model", merged, "--output", gguf_path, "--outtype", "q8_0", check=True)
    meta, tensors = read_gguf(gguf_path)
    assert meta["tokenizer.ggml.pre"] == "smollm" and "output.weight" not in tensors
    ref_meta, ref_tensors = read_gguf(convert_hf_to_gguf(merged, tmp_path / "ref.gguf", "q8_0"))
    assert tensors == ref_tensors
    assert [k for k in set(meta) | set(ref_meta) if meta.get(k) != ref_meta.get(k)
            and not ALLOWED_METADATA_DIFFERENCES.match(k)] == []
    llm = llama_cpp_model(gguf_path, n_ctx=512, n_threads=2)
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer


# --- Meta's format: LLaMA's alone -------------------------------------------------------------

LLAMA3_TOKENIZER_MODEL_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"  # Meta's release


@pytest.mark.parametrize("name", ["llama3", "llama32"])
def test_llama3_meta_export_has_params_and_metas_own_tokenizer_model(family, name, tmp_path):
    import hashlib

    from llamaforge.model import permute_into

    f = family(name)
    out = tmp_path / "meta"
    run_script("export_pth.py", "--model", f["merged"], "--output", out, check=True)
    params = json.loads((out / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and params["n_heads"] == 4 and params["rope_theta"] == 500000.0
    assert params["use_scaled_rope"] is True and params["vocab_size"] == 128256
    assert params.get("rope_scaling_factor") == (32.0 if name == "llama32" else None)
    # the tokenizer.model of Meta's Llama-3 release, byte for byte, rebuilt from the tokenizer.json
    assert hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest() == LLAMA3_TOKENIZER_MODEL_SHA256
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    hf = hf_tensors(f["merged"])
    assert torch.equal(sd["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    head = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])  # tied (3.2): Meta stores the head anyway
    assert torch.equal(sd["output.weight"], head)
    wk = hf["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(sd["layers.1.attention.wk.weight"], permute_into(torch.empty_like(wk), wk, 2, to_meta=True))


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_families_without_a_meta_format_are_refused(family, name, tmp_path):
    proc = run_script("export_pth.py", "--model", family(name)["merged"], "--output", tmp_path / "meta")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "no Meta consolidated.NN.pth format" in lines[0]
    assert not (tmp_path / "meta").exists()


@pytest.mark.parametrize("name", ["llama3", "llama32"])
def test_llama3_meta_folder_imports_back_to_the_same_model_and_tokenizer(family, name, tmp_path):
    """Meta's Llama-3 layout (params.json with use_scaled_rope, tiktoken tokenizer.model) imports as a
    Hugging Face folder: the same tensors, llama3 rope scaling, and a tokenizer.json that tokenizes
    llama.cpp's Llama-3 test vectors exactly and is recognised as llama-bpe."""
    from transformers import AutoConfig, AutoTokenizer

    from families import vocab_tests
    from llamaforge.export.gguf_meta import pre_tokenizer

    f = family(name)
    meta, back = tmp_path / "meta", tmp_path / "back"
    run_script("export_pth.py", "--model", f["merged"], "--output", meta, check=True)
    run_script("import_pth.py", "--input", meta, "--output", back, check=True)
    ours, orig = hf_tensors(back), hf_tensors(f["merged"])
    if name == "llama32":  # Meta stores the head; the import keeps it (untied)
        orig["lm_head.weight"] = orig["model.embed_tokens.weight"]
    assert sorted(ours) == sorted(orig) and all(torch.equal(ours[k], orig[k]) for k in ours)
    cfg, ref = AutoConfig.from_pretrained(back), AutoConfig.from_pretrained(f["merged"])
    assert cfg.rope_parameters == ref.rope_parameters and cfg.num_key_value_heads == 2
    assert cfg.max_position_embeddings == 131072
    tok = AutoTokenizer.from_pretrained(back)
    cases = vocab_tests("llama-bpe")
    assert [tok.encode(t, add_special_tokens=False) for t, _ in cases] == [i for _, i in cases]
    assert tok("Hi").input_ids[0] == 128000 and len(tok) == 128256
    assert pre_tokenizer(tok, back) == "llama-bpe"


@pytest.mark.slow
def test_the_pipeline_builds_each_family_with_its_evaluation(family, tmp_path):
    """config.yaml entries for Llama-3.1, Qwen2 and Mistral (base + LoRA, a tokenizer.json-only
    tokenizer extended with a token for Qwen2): merge, GGUF Q8_0 and every eval/ output."""
    import yaml

    from helpers import copy_workflow, snakemake

    wf = copy_workflow(tmp_path / "llamaforge")
    cfg = yaml.safe_load((wf / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["tokenizers"] = {"qwen-pad": {"base": str(family("qwen2")["tokenizer"]), "add_tokens": ["<|my_pad|>"]}}
    cfg["models"] = {}
    for name in ("llama3", "qwen2", "mistral"):
        f = family(name)
        cfg["models"][name] = {"base": str(f["base"]), "loras": [str(f["lora"])], "exports": ["hf", "gguf-q8_0"]}
    cfg["models"]["qwen2"]["tokenizer"] = "tokenizers/qwen-pad"
    cfg["eval"]["generation"].update(max_new_tokens=4)
    cfg["eval"]["perplexity"].update(max_length=64, stride=32)
    (wf / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    snakemake(wf, "--cores", "2", timeout=1800)
    for name in ("llama3", "qwen2", "mistral"):
        summary = json.loads((wf / "eval" / name / "summary.json").read_text())
        eq = json.loads((wf / "eval" / name / "equivalence.json").read_text())
        assert eq["passed"] and eq["top1_agreement"] == 1.0, (name, eq)
        ppl = json.loads((wf / "eval" / name / "perplexity.json").read_text())
        assert ppl["perplexity"] > 1 and ppl["scored_tokens"] > 50
        preds = json.loads((wf / "eval" / name / "predictions.json").read_text())
        gen = json.loads((wf / "eval" / name / "generation_config.json").read_text())
        assert gen["template"] == ("alpaca" if name == "mistral" else "chat") and len(preds) > 0
        assert summary["llamaforge"] and (wf / "exports" / name / f"{name}-q8_0.gguf").is_file()
    assert (wf / "merged/qwen2/tokenizer.json").read_bytes() == (wf / "tokenizers/qwen-pad/tokenizer.json").read_bytes()
    assert "Nothing to be done" in snakemake(wf, "--cores", "2", "-n").stdout


def test_phi3_partial_rotary_factor_at_the_top_of_config_json(tmp_path):
    """Phi-4-mini's config.json (saved before transformers 5) holds partial_rotary_factor at the top, not
    in rope_scaling: the rotary dimensions (and so the longrope factors' length) come from it."""
    from llamaforge.export.gguf_meta import extra_tensor_shapes
    from llamaforge.export.gguf_rope import _phi3_rope_dims
    from llamaforge.model import ModelFolder

    cfg = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 128, "num_attention_heads": 4,
           "num_key_value_heads": 4, "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 32064,
           "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "rope_scaling": {"type": "longrope", "long_factor": [1.5] * 12, "short_factor": [1.0] * 12}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = ModelFolder(tmp_path)
    assert _phi3_rope_dims(m) == 24  # 0.75 * 128 / 4, not 32
    assert extra_tensor_shapes(m) == {"rope_factors_long.weight": (12,), "rope_factors_short.weight": (12,)}
