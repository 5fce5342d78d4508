"""Multiple-choice evaluation (scripts/evaluate.py multiple-choice): the three data formats and their
one-line errors, the prompts of Chinese-LLaMA-Alpaca's scripts, lm-evaluation-harness's scoring
rules, and (slow tier) SmolLM2-135M-Instruct on easy questions, checked by an independent
reimplementation of the harness, and its Q8_0 GGUF against the Hugging Face model."""

from __future__ import annotations

import json
import math

import pytest
from helpers import run_script

from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate.mc import encode_pair, load_questions, predictions
from llamaforge.evaluate.mc.data import Question
from llamaforge.evaluate.mc.prompts import build_prompt

CEVAL = ('id,question,A,B,C,D,answer,explanation\n'
         '0,"1+1=?",1,2,3,4,B,"一加一"\n'
         '1,"下列哪个, 是水果？",石头,"苹果\n(红色)",铁,铜,B,\n')
CMMLU = (',Question,A,B,C,D,Answer\n'
         '0,中国的首都是？,上海,北京,广州,深圳,B\n'
         '1,一年有几个月？,十,十一,十二,十三,C\n')
JSONL = ('{"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}\n'
         '\n'
         '{"question": "Sky?", "choices": ["blue", "red"], "answer": "A", "subject": "nature"}\n')

# easy English questions written for these tests (SmolLM2-135M-Instruct answers most of them)
EASY = [
    ("What is the capital of France?", ["Berlin", "Paris", "Madrid", "Rome"], 1),
    ("How many legs does a dog have?", ["two", "four", "six", "eight"], 1),
    ("What color is the sky on a clear day?", ["green", "red", "blue", "black"], 2),
    ("Which animal says meow?", ["cat", "dog", "cow", "duck"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("How many days are in a week?", ["seven", "five", "ten", "three"], 0),
    ("What is the opposite of hot?", ["warm", "cold", "loud", "tall"], 1),
    ("Which fruit is yellow and long?", ["apple", "grape", "banana", "cherry"], 2),
    ("What do bees make?", ["milk", "honey", "silk", "wool"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What do cows drink?", ["water", "oil", "ink", "paint"], 0),
    ("Which season is the coldest?", ["summer", "spring", "autumn", "winter"], 3),
    ("What do you use to see?", ["ears", "eyes", "nose", "feet"], 1),
    ("Where do fish live?", ["in trees", "in water", "in the sky", "in fire"], 1),
    ("What is the largest ocean on Earth?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("Which of these is a color?", ["purple", "table", "seven", "run"], 0),
]
DEV = [("What color is grass?", ["purple", "green", "orange", "white"], 1),
       ("Which animal barks?", ["fish", "bird", "snake", "dog"], 3)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows),
                    encoding="utf-8")
    return path


def test_the_three_formats_load(tmp_path):
    """C-Eval (explanation column, a quoted comma and line break), CMMLU (index column) and JSONL
    (index or letter answers, any number of choices, blank lines) all load, each detected by content."""
    (tmp_path / "law_val.csv").write_text(CEVAL, encoding="utf-8")
    (tmp_path / "agronomy.csv").write_text(CMMLU, encoding="utf-8")
    (tmp_path / "mix.jsonl").write_text(JSONL, encoding="utf-8")
    fmt, qs = load_questions(tmp_path / "law_val.csv")
    assert fmt == "ceval" and [q.answer for q in qs] == [1, 1] and qs[0].explanation == "一加一"
    assert qs[1].question == "下列哪个, 是水果？" and qs[1].choices[1] == "苹果\n(红色)" and qs[1].subject == "law"
    fmt, qs = load_questions(tmp_path / "agronomy.csv")
    assert fmt == "cmmlu" and [(q.question, q.answer, q.subject) for q in qs] == [
        ("中国的首都是？", 1, "agronomy"), ("一年有几个月？", 2, "agronomy")]
    fmt, qs = load_questions(tmp_path / "mix.jsonl")
    assert fmt == "jsonl" and [(q.choices, q.answer, q.subject, q.row) for q in qs] == [
        (("3", "4", "5"), 1, "mix", 1), (("blue", "red"), 0, "nature", 3)]


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028, U+0085 or \\x1c raw (json.dumps(ensure_ascii=False) writes them so):
    the line is one row, not split there; CRLF line ends are fine."""
    import json

    rows = [{"question": "a\u2028b\x85c\x1cd?", "choices": ["x\u2029", "y"], "answer": 1},
            {"question": "second", "choices": ["1", "2"], "answer": "A"}]
    p = tmp_path / "odd.jsonl"
    p.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8"))
    fmt, qs = load_questions(p)
    assert fmt == "jsonl" and [(q.question, q.choices, q.answer) for q in qs] == [
        ("a\u2028b\x85c\x1cd?", ("x\u2029", "y"), 1), ("second", ("1", "2"), 0)]


@pytest.mark.parametrize("name, text, where", [
    ("bad_val.csv", CEVAL.replace(",B,\n", ",E,\n"), "row 2 (line 3): the answer 'E'"),
    ("bad_val.csv", CEVAL.replace(",B,\n", ",BC,\n"), "row 2 (line 3): the answer 'BC'"),  # not a substring test
    ("bad_val.csv", CEVAL.replace('0,"1+1=?",1,2,3,4,B', '0,"1+1=?",1,2,3,B'), "row 1 (line 2) has 7 fields"),
    ("bad.csv", CMMLU.replace("1,一年有几个月？", "1,"), "row 2 (line 3) has an empty question"),
    ("bad.csv", "q,a,b\n1,2,3\n", "unknown CSV header"),
    ("law_test.csv", "id,question,A,B,C,D\n0,q,1,2,3,4\n", "a C-Eval test split: it has no answer column"),
    ("bad.jsonl", JSONL.replace('"answer": "A"', '"answer": "C"'), "line 3: \"answer\" 'C'"),
    ("bad.jsonl", JSONL.replace('["3", "4", "5"]', '["3"]'), "line 1: \"choices\""),
    ("bad.jsonl", JSONL + "{oops\n", "line 4 is not JSON"),
])
def test_a_malformed_row_is_one_error_naming_it(tmp_path, name, text, where):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    with pytest.raises(LlamaforgeError) as e:
        load_questions(p)
    assert str(e.value).startswith(f"{p}: {where}") and "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_the_command_fails_in_one_line_and_writes_nothing(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', encoding="utf-8")
    out, items = tmp_path / "o.json", tmp_path / "o.jsonl"
    proc = run_script("evaluate.py", "multiple-choice", "--model", tmp_path / "model", "--data", data,
                      "--output", out, "--items", items)
    assert proc.returncode == 1 and not out.exists() and not items.exists()
    assert proc.stderr.strip().splitlines() == [
        f"llamaforge: error: {data}: line 1: \"answer\" '2' is neither a 0-based index nor a letter of its 2 "
        "choices. Fix: give the right choice's index or letter."]


def test_prompts_are_chinese_llama_alpacas_and_mmlus():
    """C-Eval/CMMLU: the Chinese header only with shots, shots' letters right after 答案：;
    JSONL: MMLU's header always, " {letter}" after Answer:; the cloze form of each drops the options
    and answers the shots with their text (the harness scoring's continuations follow the same way)."""
    from llamaforge.evaluate.mc.prompts import continuations

    q = Question("1+1=?", ("1", "2", "3", "4"), 1, "math", 1)
    s = Question("2+2=?", ("4", "5", "6", "7"), 0, "math", 1)
    assert build_prompt(q, [], "ceval") == "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    assert build_prompt(q, [s], "cmmlu") == ("以下是中国关于math考试的单项选择题，请选出其中的正确答案。\n\n"
                                             "2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：A\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert build_prompt(q, [s], "cmmlu", options=False) == (
        "以下是中国关于math考试的单项选择题，请选出其中的正确答案。\n\n2+2=?\n答案：4\n\n1+1=?\n答案：")
    assert continuations(q, "ceval") == ["1", "2", "3", "4"]
    q2 = Question("Sky?", ("blue", "red"), 0, "high_school_physics", 1)
    assert build_prompt(q2, [q2], "jsonl") == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Sky?\nA. blue\nB. red\nAnswer: A\n\nSky?\nA. blue\nB. red\nAnswer:")
    assert build_prompt(q2, [q2], "jsonl", options=False).endswith("Sky?\nAnswer: blue\n\nSky?\nAnswer:")
    assert continuations(q2, "jsonl") == [" blue", " red"]
    rendered = json.loads(build_prompt(q2, [q2], "jsonl", chat=lambda msgs: json.dumps(msgs)))
    assert [m["role"] for m in rendered] == ["user", "assistant", "user"]
    assert rendered[0]["content"].startswith("The following are") and rendered[1]["content"] == "A"


def test_the_harness_pair_encoding_and_norms():
    """Trailing whitespace of the context moves into the continuation; the continuation's tokens are
    the tail of tok(context + continuation) (a character tokenizer makes it visible); acc_norm
    divides by the choice's characters, acc_bytes by its UTF-8 bytes."""
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    ctx, cont = encode_pair(enc, True, 1, "Answer: ", "Paris")
    assert ctx == [1] + enc("Answer:") and cont == enc(" Paris")
    ctx, cont = encode_pair(enc, False, None, "答案：", "北京")
    assert ctx == enc("答案：") and cont == enc("北京")
    item = {"logliks": [-3.0, -4.0, -2.5], "choices": ["aaaa", "bbbbbbbb", "c"], "gold": 1,
            "first_token": {"pred": 2}}
    assert predictions(item) == {"acc": 2, "acc_norm": 1, "acc_bytes": 1, "first_token_acc": 2}
    item["choices"] = ["一二", "ab", "c"]  # 6 bytes vs 2 bytes: bytes and characters disagree
    item["logliks"] = [-2.2, -1.2, -2.0]
    assert predictions(item)["acc_norm"] == 1 and predictions(item)["acc_bytes"] == 0


def test_the_demo_merge_and_its_gguf(inputs, tmp_path):
    """The demo's tiny merge, Hugging Face and Q8_0 GGUF, on the bundled bilingual set with 2 shots:
    both write every item, with the same prompts, logliks close, and the summary's accuracies are
    what the items give."""
    from llamaforge.tokenizer import bundled_text  # noqa: F401

    import llamaforge

    data = __import__("pathlib").Path(llamaforge.__file__).parent / "data"
    model = inputs["merged"]
    q8 = tmp_path / "d-q8_0.gguf"
    run_script("export_gguf.py", "--model", model, "--output", q8, "--outtype", "q8_0", check=True)
    res = {}
    for kind, src in (("model", model), ("gguf", q8)):
        out, items = tmp_path / f"{kind}.json", tmp_path / f"{kind}.jsonl"
        run_script("evaluate.py", "multiple-choice", f"--{kind}", src, "--data", data / "mc_demo.jsonl",
                   "--shots", "2", "--dev", data / "mc_demo_dev.jsonl", "--output", out, "--items", items, check=True)
        rows = [json.loads(x) for x in items.read_text(encoding="utf-8").splitlines()]
        summary = json.loads(out.read_text(encoding="utf-8"))
        assert len(rows) == summary["questions"] == 12
        assert summary["scores"]["acc"] == sum(predictions(r)["acc"] == r["gold"] for r in rows) / 12
        res[kind] = rows
    for a, b in zip(res["model"], res["gguf"]):
        assert a["context"] == b["context"] and a["continuations"] == b["continuations"] and a["add_bos"] == b["add_bos"]
        assert max(abs(x - y) for x, y in zip(a["logliks"], b["logliks"])) < 0.05
    first = res["model"][0]
    assert first["context"].startswith("The following are multiple choice questions (with answers)")
    assert first["context"].endswith("What is the capital of France?\nAnswer:") and first["continuations"][1] == " Paris"
    assert first["first_token"]["prompt"].endswith("A. Berlin\nB. Paris\nC. Madrid\nD. Rome\nAnswer:")
    assert all(math.isfinite(x) for r in res["model"] for x in r["logliks"])
    # a C-Eval CSV with one shot from a dev CSV: Chinese-LLaMA-Alpaca's prompt; the SentencePiece
    # tokenizer adds a BOS; the letters' two tokens are "▁A" and "A"
    (tmp_path / "law_val.csv").write_text(CEVAL, encoding="utf-8")
    (tmp_path / "law_dev.csv").write_text(CEVAL, encoding="utf-8")
    out, items = tmp_path / "ceval.json", tmp_path / "ceval.jsonl"
    run_script("evaluate.py", "multiple-choice", "--model", model, "--data", tmp_path / "law_val.csv", "--shots", "1",
               "--dev", tmp_path / "law_dev.csv", "--output", out, "--items", items, check=True)
    rows = [json.loads(x) for x in items.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["context"] == "以下是中国关于law考试的单项选择题，请选出其中的正确答案。\n\n1+1=?\n答案：2\n\n1+1=?\n答案："
    assert rows[0]["first_token"]["prompt"].endswith("1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert rows[0]["continuations"] == ["1", "2", "3", "4"] and rows[0]["add_bos"] is True
    assert all(a != b for a, b in rows[0]["first_token"]["letter_ids"])


def _harness_logliks(model, tok, item) -> list[float]:
    """lm-evaluation-harness's loglikelihood of each continuation, written here from its rules
    (TemplateLM._encode_pair, HFLM._loglikelihood_tokens) on a plain transformers forward of the
    whole sequence: independent of llamaforge's batched scoring."""
    import torch

    out = []
    for cont in item["continuations"]:
        ctx = item["context"]
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        bos = [tok.bos_token_id] if item["add_bos"] else []
        whole = bos + tok(ctx + cont, add_special_tokens=False).input_ids
        ctx_ids = bos + tok(ctx, add_special_tokens=False).input_ids
        cont_ids = whole[len(ctx_ids):]
        inp = torch.tensor([(ctx_ids + cont_ids)[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0].double(), -1)[-len(cont_ids):]
        out.append(float(logp.gather(1, torch.tensor(cont_ids)[:, None]).sum()))
    return out


@pytest.mark.slow
def test_smollm2_on_easy_questions_as_the_harness_scores_them_and_its_q8_0_gguf(tmp_path):
    """SmolLM2-135M-Instruct on easy English questions (2 shots): acc above chance; every item's
    logliks recomputed from the items file by an independent harness within 0.05 nats, same answers
    (prompts as they are, and through its ChatML template); its Q8_0 GGUF's logliks agree with the
    Hugging Face model's within what the export's own KL figure allows."""
    import torch
    from families import smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = smollm2()
    data, dev = _jsonl(tmp_path / "easy.jsonl", EASY), _jsonl(tmp_path / "easy_dev.jsonl", DEV)
    rows, summaries = {}, {}
    for name, args in (("plain", ["--model", model]), ("chat", ["--model", model, "--template", "auto"])):
        out, items = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        run_script("evaluate.py", "multiple-choice", *args, "--data", data, "--shots", "2", "--dev", dev,
                   "--output", out, "--items", items, check=True)
        rows[name] = [json.loads(x) for x in items.read_text(encoding="utf-8").splitlines()]
        summaries[name] = json.loads(out.read_text(encoding="utf-8"))
    s = summaries["plain"]
    assert s["questions"] == len(EASY) and s["chance"] == 0.25
    assert s["scores"]["acc"] >= 0.5, s["scores"]  # chance is 0.25; measured 0.81
    assert rows["chat"][0]["context"].endswith("<|im_start|>assistant\n") and summaries["chat"]["chat_template_applied"]

    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for name, n in (("plain", len(EASY)), ("chat", 4)):  # every item; the chat-templated run's first 4
        for r in rows[name][:n]:
            ref = _harness_logliks(hf, tok, r)
            assert max(abs(a - b) for a, b in zip(ref, r["logliks"])) < 0.05, (name, r["row"])
            assert max(range(len(ref)), key=ref.__getitem__) == predictions(r)["acc"]
    del hf

    q8 = tmp_path / "smol-q8_0.gguf"
    run_script("export_gguf.py", "--model", model, "--output", q8, "--outtype", "q8_0", check=True)
    quality, text = tmp_path / "gguf.json", tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. A week has seven days, and bees make honey. "
                    "Water freezes into ice in the winter, the coldest season of the year.\n", encoding="utf-8")
    run_script("evaluate.py", "gguf-quality", "--model", model, "--gguf", q8, "--text", text, "--max-length", "128",
               "--stride", "64", "--output", quality, check=True)
    kl = json.loads(quality.read_text())["exports"][0]["kl_mean"]
    out, items = tmp_path / "q8.json", tmp_path / "q8.jsonl"
    run_script("evaluate.py", "multiple-choice", "--gguf", q8, "--data", data, "--shots", "2", "--dev", dev,
               "--output", out, "--items", items, check=True)
    got = [json.loads(x) for x in items.read_text(encoding="utf-8").splitlines()]
    diffs, ntok = [], []
    for a, b in zip(rows["plain"], got):
        assert (a["context"], a["continuations"], a["add_bos"]) == (b["context"], b["continuations"], b["add_bos"])
        diffs += [abs(x - y) for x, y in zip(a["logliks"], b["logliks"])]
        ctx_len = len(tok(a["context"].rstrip(), add_special_tokens=False).input_ids)
        ntok += [len(tok(a["context"] + c, add_special_tokens=False).input_ids) - ctx_len for c in a["continuations"]]
    per_token = sum(diffs) / sum(ntok)
    # KL(p||q) ~ Var(log p - log q) / 2 for a small perturbation: the typical per-token |delta loglik| is
    # sqrt(2 KL); measured here: KL 0.0055, mean |delta| per token 0.12 against a bound of 0.21
    print(f"Q8_0: mean KL {kl:.5f}, mean |delta loglik| per token {per_token:.5f}, bound {2 * math.sqrt(2 * kl):.5f}")
    assert per_token <= 2 * math.sqrt(2 * kl), (per_token, kl)
    q8_summary = json.loads(out.read_text())
    assert q8_summary["scorer"]["kind"] == "llama.cpp" and 8 < q8_summary["scorer"]["bits_per_weight"] < 9
    assert abs(q8_summary["scores"]["acc"] - s["scores"]["acc"]) <= 2 / len(EASY)


@pytest.mark.slow
@pytest.mark.xdist_group("demo_build")
def test_the_demo_build_scores_each_model_and_export(built):
    """The quickstart's outputs: per model the merged model's and each GGUF export's result and items,
    the summary's table (every export, sorted by bits per weight), and the plot in the report."""
    from helpers import snakemake

    for model, types in (("demo-llama", ["f16", "q8_0"]), ("demo", ["f16", "q8_0", "q4_k_m", "q6_k"])):
        mc = built / "eval" / model / "mc"
        assert sorted(p.name for p in mc.glob("*.json")) == sorted(["demo.json"] + [f"demo.{t}.json" for t in types])
        for p in mc.glob("*.json"):
            items = [json.loads(x) for x in p.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()]
            assert len(items) == json.loads(p.read_text())["questions"] == 12
        table = json.loads((built / "eval" / model / "summary.json").read_text())["multiple_choice"]["demo"]
        assert table["merged"] is not None and table["chance"] == 0.25
        assert sorted(r["file"] for r in table["exports"]) == sorted(f"{model}-{t}.gguf" for t in types)
        bpw = [r["bits_per_weight"] for r in table["exports"]]
        assert bpw == sorted(bpw) and 15 < bpw[-1] < 17
    snakemake(built, "--report", "report.html")
    assert "filename=multiple_choice.png;base64,iVBORw0KGgo" in (built / "report.html").read_text()
