"""Inference (issue 5): templates, instruction files, batched generation, seeds, the REPL, and the
checks of the adapter chain, on the demo models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TOKENIZER_FILES, peft_merge, run_script

from llamaforge.errors import LlamaforgeError
from llamaforge.generate import (
    ORIGINAL_GENERATION,
    TEMPLATES,
    ChatSession,
    GenerationSettings,
    Generator,
    interactive,
    load_model,
    predict,
    read_examples,
)

PROMPTS = ["Hello, who are you?", "白日依山尽，黄河入海流。", "Write a long story about a dragon that lives in the "
           "mountains and guards a treasure.", "hi", "为什么要减少污染，保护环境？", "One two three four five six.",
           "春眠不觉晓", "Tell me a joke about cats and dogs."]


@pytest.fixture(scope="module")
def merged(demo, tmp_path_factory) -> Path:
    """The demo Chinese-Alpaca-Plus: base + LLaMA-Plus + Alpaca-Plus, float32."""
    return peft_merge(demo / "base", [demo / "lora_llama_plus", demo / "lora_alpaca_plus"], demo / "lora_alpaca_plus",
                      tmp_path_factory.mktemp("merged") / "demo")


@pytest.fixture(scope="module")
def loaded(merged):
    return load_model(merged, echo=lambda *a: None)


def greedy(n=10, **kw) -> GenerationSettings:
    return GenerationSettings(do_sample=False, max_new_tokens=n, **kw)


# ---------------------------------------------------------------------------------------------
# templates and instruction files


def test_templates_are_the_originals():
    header = ("Below is an instruction that describes a task. "
              "Write a response that appropriately completes the request.\n\n")
    assert TEMPLATES["alpaca"].prompt("Q") == header + "### Instruction:\n\nQ\n\n### Response:\n\n"
    assert TEMPLATES["alpaca"].prompt("Q", "I") == header + "### Instruction:\n\nQ\nI\n\n### Response:\n\n"
    assert TEMPLATES["alpaca-train"].prompt("Q", "I") == header + "### Instruction:\nQ\nI\n\n### Response: "
    assert TEMPLATES["none"].prompt("Q") == "Q"
    chat = TEMPLATES["alpaca"].chat([("a", "b")], "c")
    assert chat == header + "### Instruction:\n\na\n\n### Response:\n\nb\n\n### Instruction:\n\nc\n\n### Response:\n\n"
    assert ORIGINAL_GENERATION == dict(temperature=0.2, top_k=40, top_p=0.9, do_sample=True, num_beams=1,
                                       repetition_penalty=1.1, max_new_tokens=400)


#: the strings every prompt format rendered to before llamaforge.model.prompts defined them once (byte for byte)
ALPACA_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}"
    "{%- else -%}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\\n\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '### Instruction:\\n\\n' + message['content'] + '\\n\\n### Response:\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + '\\n\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)
MODELFILE_TEMPLATES = {
    "alpaca": ("{{ if .System }}{{ .System }}\n\n{{ end }}Below is an instruction that describes a task. Write a "
               "response that appropriately completes the request.\n\n### Instruction:\n\n{{ .Prompt }}\n\n"
               "### Response:\n\n{{ .Response }}", ["### Instruction:"]),
    "chatml": ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
               '{{ .Response }}<|im_end|>\n', ["<|im_start|>", "<|im_end|>"]),
    "llama3": ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
               '{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}'
               '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>',
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "inst": ("[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
             ["[INST]", "[/INST]"]),
    # Gemma-3's and Phi-3's (issue 22): their chat templates' turns, Ollama's Go syntax
    "gemma": ("<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
              "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n", ["<end_of_turn>"]),
    "phi3": ("{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}"
             "<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>\n", ["<|end|>", "<|user|>", "<|assistant|>"]),
}


def test_one_prompt_definition_renders_todays_strings():
    """llamaforge.model.prompts is the one definition of each format: the GGUF chat template and every
    Modelfile TEMPLATE + stop list it renders are exactly the strings written out before."""
    import jinja2

    from llamaforge.export import gguf_meta as gguf_file
    from llamaforge.export import modelfile as quantize
    from llamaforge.model.prompts import (
        ALPACA_CHAT_TEMPLATE,
        FORMATS,
        MODELFILE_FORMATS,
        Template,
        jinja_chat_template,
        modelfile_template,
        prompt_format,
    )

    assert ALPACA_CHAT_TEMPLATE == ALPACA_JINJA == jinja_chat_template(FORMATS["alpaca"])
    assert gguf_file.ALPACA_CHAT_TEMPLATE == ALPACA_JINJA
    assert set(MODELFILE_FORMATS) == set(MODELFILE_TEMPLATES)
    for name, want in MODELFILE_TEMPLATES.items():
        assert modelfile_template(name) == want, name
    # the Modelfile's text around them
    text = quantize.modelfile_text("m.gguf", "{{ '<|im_start|>' }}", {"temperature": 0.2})
    assert f'TEMPLATE """{MODELFILE_TEMPLATES["chatml"][0]}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()
    assert [prompt_format(t) for t in (None, "", "<|im_start|>", "<|start_header_id|>", "[INST]", "x",
                                       "<start_of_turn>", "<|user|><|end|><|assistant|>")] == [
        "alpaca", "alpaca", "chatml", "llama3", "inst", "alpaca", "gemma", "phi3"]
    assert quantize.prompt_format is prompt_format
    # the Jinja and the Python renderings of a format agree (single turn, history, a system message)
    for name in ("alpaca", "alpaca-train", "none", "chatml", "llama3", "phi3"):
        t, tpl = jinja2.Template(jinja_chat_template(FORMATS[name])), TEMPLATES.get(name) or Template.of(FORMATS[name])
        assert t.render(messages=[{"role": "user", "content": "为什么？"}]) == tpl.prompt("为什么？"), name
        history = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                   {"role": "user", "content": "Q2"}]
        assert t.render(messages=history) == tpl.chat([("Q1", "A1")], "Q2"), name
    assert jinja2.Template(ALPACA_JINJA).render(messages=[{"role": "system", "content": "S"},
                                                          {"role": "user", "content": "Q"}]) == (
        "S\n\n### Instruction:\n\nQ\n\n### Response:\n\n")
    with pytest.raises(ValueError, match="inst"):
        jinja_chat_template(FORMATS["inst"])


def test_the_prompt_module_imports_no_torch():
    code = ("import sys, llamaforge.model.prompts, llamaforge.generate; "
            "assert not {'torch', 'transformers', 'peft'} & set(sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr


def test_read_examples_text_json_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\n  second  \n", encoding="utf-8")
    assert [(e.instruction, e.input) for e in read_examples(tmp_path / "a.txt")] == [("first", ""), ("second", "")]
    recs = [{"instruction": "翻译", "input": "hello", "output": "x"}, {"instruction": "Q2"}]
    (tmp_path / "b.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    assert [(e.instruction, e.input) for e in read_examples(tmp_path / "b.json")] == [("翻译", "hello"), ("Q2", "")]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    assert [(e.instruction, e.input) for e in read_examples(tmp_path / "c.jsonl")] == [("翻译", "hello"), ("Q2", "")]
    for name, text, words in [("d.json", "[{", "invalid JSON"), ("e.jsonl", '{"instruction": "x"}\nnope\n', "line 2"),
                              ("f.json", '[{"input": "x"}]', "no 'instruction'"), ("g.txt", "\n\n", "no instruction")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(LlamaforgeError, match=words) as e:
            read_examples(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "Fix:" in str(e.value)


# ---------------------------------------------------------------------------------------------
# generation


def naive_greedy(model, tok, prompt: str, n: int, penalty: float) -> list[int]:
    """Greedy decoding by hand: full forward each step, CTRL repetition penalty over all seen ids."""
    ids = tok(prompt).input_ids
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            seen = torch.tensor(sorted(set(ids)))
            s = logits[seen]
            logits[seen] = torch.where(s < 0, s * penalty, s / penalty)
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def test_predictions_file_format_and_content(merged, loaded, tmp_path):
    data = [{"instruction": "Translate into Chinese.", "input": "Good morning"}, {"instruction": "白日依山尽"},
            {"instruction": "Write a poem about the sea."}]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in data), encoding="utf-8")
    # bare file names, no directory part (inference_hf.py crashed on those)
    proc = run_script("inference.py", "--model", merged, "--data-file", "prompts.jsonl", "--predictions-file",
                      "preds.json", "--greedy", "--max-new-tokens", "8", "--batch-size", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    preds = json.loads((tmp_path / "preds.json").read_text(encoding="utf-8"))
    assert [list(p) for p in preds] == [["instruction", "input", "prompt", "output"]] * 3
    assert [(p["instruction"], p["input"]) for p in preds] == [
        ("Translate into Chinese.", "Good morning"), ("白日依山尽", ""), ("Write a poem about the sea.", "")]
    assert preds[0]["prompt"] == TEMPLATES["alpaca"].prompt("Translate into Chinese.", "Good morning")
    # content: what a hand-written greedy loop decodes (batched, left padded, with the penalty)
    for p in preds:
        ids = naive_greedy(loaded.model, loaded.tokenizer, p["prompt"], 8, 1.1)
        assert p["output"] == loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert p["output"]
    cfg = json.loads((tmp_path / "generation_config.json").read_text())
    assert cfg["do_sample"] is False and cfg["max_new_tokens"] == 8 and cfg["batch_size"] == 2
    assert {k: cfg[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")} == {
        "temperature": 0.2, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}
    assert cfg["template"] == "alpaca" and cfg["dtype"] == "float32"
    assert "=======2=======" in proc.stdout and "Output: " in proc.stdout


def test_greedy_batched_equals_one_at_a_time(loaded):
    gen = Generator(loaded, greedy(12))
    batched = gen.generate(PROMPTS, batch_size=8)
    single = [gen.generate([p], batch_size=1)[0] for p in PROMPTS]
    assert [g.ids for g in batched] == [g.ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(len(g.ids) > 0 for g in batched)
    # an odd batch size too (mixed padding per batch)
    assert [g.ids for g in gen.generate(PROMPTS, batch_size=3)] == [g.ids for g in single]


def test_padding_is_not_a_repeated_token(loaded):
    """The stock repetition penalty counts the pad id of padded rows; ours does not."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from llamaforge.generate import _padded_penalty_class

    scores = torch.randn(2, 50)
    ids = torch.tensor([[7, 7, 3, 9, 1], [0, 0, 3, 4, 5]])  # row 2 is left padded with id 0
    ours = _padded_penalty_class()(1.3, torch.tensor([0, 2]))(ids, scores.clone())
    stock = RepetitionPenaltyLogitsProcessor(1.3)
    assert torch.equal(ours[0], stock(ids[:1], scores[:1].clone())[0])
    assert torch.equal(ours[1], stock(ids[1:, 2:], scores[1:].clone())[0])


def test_adapters_on_the_fly_equal_the_merged_model(demo, loaded):
    on_the_fly = load_model(demo / "base", [demo / "lora_llama_plus", demo / "lora_alpaca_plus"], echo=lambda *a: None)
    assert on_the_fly.vocab == loaded.vocab == 1190
    assert type(on_the_fly.model).__name__.startswith("Peft")  # the last adapter is live, not merged
    a = Generator(on_the_fly, greedy(10)).generate(PROMPTS[:4], batch_size=4)
    b = Generator(loaded, greedy(10)).generate(PROMPTS[:4], batch_size=4)
    assert [g.ids for g in a] == [g.ids for g in b]


def test_seeded_sampling_is_reproducible(loaded):
    def sample(seed, temperature=0.2):
        s = GenerationSettings(max_new_tokens=12, seed=seed, temperature=temperature)
        return [g.ids for g in Generator(loaded, s).generate(PROMPTS[:4], batch_size=2)]

    assert sample(123) == sample(123)
    assert sample(7, 1.0) == sample(7, 1.0)
    assert sample(7, 1.0) != sample(8, 1.0)


def test_predict_library_seeded(merged, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:3]) + "\n", encoding="utf-8")
    settings = GenerationSettings(max_new_tokens=6, seed=5)
    a = predict(merged, tmp_path / "a" / "p.json", tmp_path / "p.txt", settings=settings, echo=lambda *x: None)
    b = predict(merged, tmp_path / "b" / "p.json", tmp_path / "p.txt", settings=settings, echo=lambda *x: None)
    assert a == b and len(a) == 3
    assert (tmp_path / "a" / "generation_config.json").is_file()


# ---------------------------------------------------------------------------------------------
# interactive


def test_interactive_repl_through_stdin(merged):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "inference.py"), "--model", str(merged), "--interactive", "--greedy",
         "--max-new-tokens", "5"],
        input="Hello there\n白日依山尽\n\nthis line is never read\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Start inference with instruction mode." in out and "single-turn" in out
    assert out.count("Input:") == 3  # two questions, then the empty line
    # the prompt "Input:" has no newline and a pipe does not echo, so each answer follows it on its line
    responses = re.findall(r"Response: (.*)", out)
    assert len(responses) == 2 and all(r.strip() for r in responses)
    assert "never read" not in out


def test_chat_keeps_history_within_the_context(loaded):
    questions = ["first question", "second question", "third question"]
    lines = iter(questions + [""])
    seen = []
    n = interactive(loaded.sources["model"], chat=True, settings=greedy(4), read=lambda _: next(lines),
                    echo=seen.append)
    # the REPL answers as a chat session on the same model does, history included
    chat = ChatSession(Generator(loaded, greedy(4)), TEMPLATES["alpaca"])
    assert n == 3
    assert [s.removeprefix("Response: ").removesuffix("\n") for s in seen if s.startswith("Response: ")] == [
        chat.ask(q) for q in questions]

    gen = Generator(loaded, greedy(4))
    tpl = TEMPLATES["alpaca"]
    session = ChatSession(gen, tpl)
    session.budget = 200  # a small context (one turn is ~55 tokens): the history must be cut

    def fits(turns: int) -> bool:
        recent = session.history[len(session.history) - turns:]
        return len(gen.encode(tpl.chat(recent, "next"))) <= session.budget

    for i in range(6):
        session.ask(f"question number {i} about the weather in the mountains")
        ids, kept = session.prompt_ids("next")
        # the most recent turns that fit, and no fewer
        assert fits(kept) and (kept == len(session.history) or not fits(kept + 1))
        assert ids == gen.encode(tpl.chat(session.history[len(session.history) - kept:], "next"))
    assert 0 < len(session.history) < 6
    assert session.history[-1][0] == "question number 5 about the weather in the mountains"
    # history is in the prompt
    ids, kept = session.prompt_ids("next")
    assert kept >= 1 and "question number 5" in loaded.tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------
# misuse of the adapter chain


def test_alpaca_plus_without_llama_plus(demo):
    with pytest.raises(LlamaforgeError, match="LLaMA-Plus") as e:
        load_model(demo / "base", [demo / "lora_alpaca_plus"], echo=lambda *a: None)
    msg = str(e.value)
    assert "32000" in msg and "49953" in msg and "49954" in msg and "512 rows" in msg
    assert str(demo / "lora_alpaca_plus") in msg and "Fix:" in msg
    # wrong order: the same error first; allowed through, the vocabulary would shrink
    with pytest.raises(LlamaforgeError, match="LLaMA-Plus"):
        load_model(demo / "base", [demo / "lora_alpaca_plus", demo / "lora_llama_plus"], echo=lambda *a: None)
    with pytest.raises(LlamaforgeError, match="never shrink"):
        load_model(demo / "base", [demo / "lora_alpaca_plus", demo / "lora_llama_plus"], allow_vocab_jump=True,
                   echo=lambda *a: None)
    # Chinese-Alpaca v1 style (trained on the base directly) is allowed when asked for
    m = load_model(demo / "base", [demo / "lora_alpaca_plus"], allow_vocab_jump=True, echo=lambda *a: None)
    assert m.vocab == 1190


def test_alpaca_plus_without_llama_plus_cli(demo):
    proc = run_script("inference.py", "--model", demo / "base", "--lora", demo / "lora_alpaca_plus", "--greedy")
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if line.startswith("llamaforge: error:")]
    assert len(err) == 1 and "LLaMA-Plus" in err[0] and "Traceback" not in proc.stderr


def test_tokenizer_that_does_not_fit_the_model(demo, merged):
    # a Chinese (1189) tokenizer on the 512-row base with no full-embedding adapter
    with pytest.raises(LlamaforgeError, match="no adapter stores full embeddings") as e:
        load_model(demo / "base", tokenizer=demo / "lora_llama_plus", echo=lambda *a: None)
    assert "1189 tokens" in str(e.value) and "512 embedding rows" in str(e.value)
    # the Alpaca tokenizer (1190) with the LLaMA-Plus adapter only (1189 rows)
    with pytest.raises(LlamaforgeError, match="1190 tokens but the model has 1189"):
        load_model(demo / "base", [demo / "lora_llama_plus"], tokenizer=demo / "lora_alpaca_plus", echo=lambda *a: None)
    # the base tokenizer (512) on the merged 1190-row model
    with pytest.raises(LlamaforgeError, match="512 tokens"):
        load_model(merged, tokenizer=demo / "base", echo=lambda *a: None)


def test_adapter_with_the_wrong_tokenizer_beside_it(demo, tmp_path):
    bad = tmp_path / "lora"
    shutil.copytree(demo / "lora_llama_plus", bad)
    for name in TOKENIZER_FILES:
        shutil.copy(demo / "lora_alpaca_plus" / name, bad / name)
    with pytest.raises(LlamaforgeError, match="1189 embedding rows but the tokenizer in its folder has 1190"):
        load_model(demo / "base", [bad], echo=lambda *a: None)
    with pytest.raises(LlamaforgeError, match="not a PEFT adapter"):
        load_model(demo / "base", [demo / "base"], echo=lambda *a: None)


def test_bad_settings():
    with pytest.raises(LlamaforgeError, match="temperature"):
        GenerationSettings(temperature=0).check()
    with pytest.raises(LlamaforgeError, match="top_p"):
        GenerationSettings(top_p=1.5).check()
    GenerationSettings(temperature=0, do_sample=False).check()  # unused under greedy


def test_adapter_with_only_tokenizer_json_has_a_tokenizer(demo, tmp_path):
    """The tokenizer package's rule (has_tokenizer), as the merge's: tokenizer.json alone (+
    tokenizer_config.json) beside an adapter is its tokenizer, with the pad id tokenizer_config.json names."""
    from llamaforge.generate import default_tokenizer_dir, inspect_adapters, plan_vocab
    from llamaforge.tokenizer import has_tokenizer

    ad = tmp_path / "lora_alpaca_plus"
    shutil.copytree(demo / "lora_alpaca_plus", ad)
    (ad / "tokenizer.model").unlink()
    (ad / "special_tokens_map.json").unlink()
    assert sorted(p.name for p in ad.glob("tokenizer*")) == ["tokenizer.json", "tokenizer_config.json"]
    assert has_tokenizer(ad)
    assert default_tokenizer_dir(demo / "base", [demo / "lora_llama_plus", ad]) == ad
    assert default_tokenizer_dir(demo / "base", [ad, tmp_path]) == ad  # a folder without one is passed over
    [info] = inspect_adapters(demo / "base", [ad])
    [sp] = inspect_adapters(demo / "base", [demo / "lora_alpaca_plus"])
    assert (info.rows, info.tokenizer_len, info.pad_id) == (sp.rows, sp.tokenizer_len, sp.pad_id) == (1190, 1190, 1189)
    # so the chain check knows the Alpaca-Plus adapter by it
    with pytest.raises(LlamaforgeError, match="LLaMA-Plus"):
        plan_vocab(512, [info], 1190)
    # no pad_token named: no pad id (and no error)
    cfg = json.loads((ad / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["pad_token"]
    (ad / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    [info] = inspect_adapters(demo / "base", [ad])
    assert info.tokenizer_len == 1190 and info.pad_id is None


_CONFIG_OPENS: list | None = None  # while a test records: (path, the file of the code that opened it)


def _record_config_opens(event: str, args) -> None:
    """Audit hook (installed once per process; audit hooks cannot be removed): each open of a
    config.json while a test records, with the innermost frame outside the standard library."""
    if _CONFIG_OPENS is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    if os.path.basename(path) != "config.json":
        return
    import sysconfig

    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep
    frame = sys._getframe(1)
    while frame is not None:  # pathlib, io, json...: the opener is the first frame beyond the standard library
        name = frame.f_code.co_filename
        real = os.path.realpath(name)
        in_stdlib = real.startswith(stdlib) and not {"site-packages", "dist-packages"} & set(Path(real).parts)
        if not (name.startswith("<") or in_stdlib):
            break
        frame = frame.f_back
    _CONFIG_OPENS.append((os.path.realpath(path), os.path.realpath(frame.f_code.co_filename) if frame else "?"))


def test_load_model_reads_config_json_once(demo, monkeypatch):
    """One ModelFolder per model input, passed down: llamaforge code opens (and parses) the model's
    config.json at most once in load_model; transformers' own from_pretrained reads it again, which
    is outside llamaforge's control and not counted."""
    global _CONFIG_OPENS
    import llamaforge
    import llamaforge.files.hashing as hashing
    import llamaforge.model
    import llamaforge.model.folder as folder

    if not getattr(test_load_model_reads_config_json_once, "hooked", False):
        sys.addaudithook(_record_config_opens)
        test_load_model_reads_config_json_once.hooked = True
    package = os.path.realpath(Path(llamaforge.__file__).parent) + os.sep
    config = os.path.realpath(demo / "base" / "config.json")
    parsed = []
    read_hf_config = folder.read_hf_config
    counted = lambda f: parsed.append(f) or read_hf_config(f)  # noqa: E731
    monkeypatch.setattr(folder, "read_hf_config", counted)
    monkeypatch.setattr(llamaforge.model, "read_hf_config", counted)
    hashing._metadata.clear()  # nothing served from an earlier test's reads: the first read opens the file
    _CONFIG_OPENS = []
    try:
        loaded = load_model(demo / "base", echo=lambda *a: None)
    finally:
        opens, _CONFIG_OPENS = _CONFIG_OPENS, None
    assert loaded.vocab == 512
    opens = [who for path, who in opens if path == config]
    ours = [who for who in opens if who.startswith(package)]
    assert opens, "the audit hook saw no open of config.json at all"
    assert len(opens) > len(ours), "transformers' own reads were not told apart"
    assert len(ours) <= 1, f"llamaforge opened config.json {len(ours)} times: {ours}"
    assert len(parsed) == 1, f"config.json parsed {len(parsed)} times"
