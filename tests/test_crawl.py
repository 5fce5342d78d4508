"""Instruction crawling (issue 6): parsing, ROUGE-L dedup, prompts, and whole crawls through the
real openai client against the scripted server in crawl_server.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
from crawl_server import FakeChatServer
from llamaforge.crawl import (
    DedupIndex,
    MAX_OUTPUT_CHARS,
    build_prompt,
    check_item,
    crawl,
    lcs_length,
    parse_reply,
    rouge_l,
)
from llamaforge.errors import LlamaforgeError

SCRIPT = REPO / "scripts" / "crawl_prompts.py"
KEY = "sk-llamaforge-TEST-key-5f3a9c0e77"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def run(server: FakeChatServer, output: Path, num_requests: int, **options):
    """An in-process crawl against `server`, with fast retries and no progress bar."""
    settings = dict(base_url=server.url, api_key=server.api_key, backoff=0.01, timeout=5.0, progress=False)
    settings.update(options)
    return crawl(output, num_requests, **settings)


def cli_env(key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = key
    return env


def cli_args(server: FakeChatServer, output: Path, num_requests: int, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--output", str(output), "--num-requests", str(num_requests),
            "--base-url", server.url, "--backoff", "0.01", "--timeout", "5", *extra]


def assert_no_near_duplicates(items: list[dict]) -> None:
    instructions = [item["instruction"] for item in items]
    assert len(set(instructions)) == len(instructions)
    for i, a in enumerate(instructions):
        for b in instructions[:i]:
            assert rouge_l(a, b) <= 0.7, (a, b)


def assert_key_nowhere(key: str, folder: Path, *texts: str) -> None:
    for text in texts:
        assert key not in text
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert key.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------------------------
# Prompt


def test_prompt_is_a_pure_function_of_seed_and_index():
    recipe = json.loads((REPO / "src/llamaforge/data/crawl_prompt.json").read_text("utf-8"))
    prompt = build_prompt(3, 7)
    assert prompt == build_prompt(3, 7)
    assert prompt != build_prompt(3, 8) and prompt != build_prompt(4, 7)
    assert prompt.startswith("你需要尽可能给出多样化的任务指令和对应的回答。")
    topics, tasks = re.findall(r"例如：(.*?)等。", prompt)
    assert len(set(topics.split("、"))) == 10 and set(topics.split("、")) <= set(recipe["topics"])
    assert len(set(tasks.split("、"))) == 10 and set(tasks.split("、")) <= set(recipe["tasks"])
    assert 80 <= int(re.search(r"字数不超过(\d+)字", prompt).group(1)) <= 120
    assert 128 <= int(re.search(r"内容应少于(\d+)字", prompt).group(1)) <= 512
    assert "满足条件的20条JSON格式数据" in prompt
    assert "满足条件的7条JSON格式数据" in build_prompt(3, 7, items_per_request=7)
    # Resuming a crawl relies on old prompts staying the same: a change here breaks resumes of
    # crawls started with an earlier version.
    assert hashlib.sha256(build_prompt(0, 0).encode()).hexdigest()[:16] == "38312ac39d5367a6"


# --------------------------------------------------------------------------------------------
# Parsing and validation

POEM = {"instruction": "写一首关于春天的诗", "input": "", "output": "春眠不觉晓，处处闻啼鸟。"}
HELLO = {"instruction": "把下面的句子翻译成中文", "input": "Hello, world!", "output": "你好，世界！"}
ONE = json.dumps(POEM, ensure_ascii=False)
TWO = json.dumps(HELLO, ensure_ascii=False)


@pytest.mark.parametrize("text", [
    f"[{ONE}, {TWO}]",
    f"好的，以下是数据：\n```json\n[{ONE},\n{TWO}]\n```\n希望有帮助。",
    f"```\n[{ONE}, {TWO}]\n```",
    f"[\n{ONE[:-1]},}},\n{TWO},\n]",
    f"{ONE}\n{TWO}\n",
    f"以下是两条数据：\n[{ONE}, {TWO}]\n以上数据仅供参考。",
    f"第一条：{ONE}\n第二条：{TWO}",
    json.dumps({"data": [POEM, HELLO]}, ensure_ascii=False),
    json.dumps([{"指令": d["instruction"], "输入": d["input"], "输出": d["output"]} for d in (POEM, HELLO)],
               ensure_ascii=False),
    json.dumps([{"Instruction": d["instruction"], "<input>": d["input"], "response": d["output"]}
                for d in (POEM, HELLO)], ensure_ascii=False),
], ids=["list", "fenced-prose", "fenced-bare", "trailing-commas", "one-per-line", "prose-around",
        "objects-in-prose", "wrapper-object", "chinese-keys", "key-variants"])
def test_parse_reply_reads_messy_formats(text):
    assert parse_reply(text) == [POEM, HELLO]


def test_parse_reply_keeps_what_it_can_and_marks_the_rest_malformed():
    assert parse_reply("抱歉，我无法完成这个任务。") == [None]
    assert parse_reply("") == [None]
    # cut off at max_tokens
    assert parse_reply(f'[{ONE}, {{"instruction": "写一封信", "outp') == [POEM, None]
    # one broken object among good ones; non-objects in a list
    assert parse_reply(f'{ONE}\n{{"instruction": "坏", "output": }}\n{TWO}') == [POEM, None, HELLO]
    assert parse_reply(f'["第一条", {ONE}, 3]') == [None, POEM, None]
    assert parse_reply('[{"title": "没有指令字段"}]') == [None]


def test_parse_reply_handles_strings_with_newlines_braces_and_non_text_values():
    text = ('{"instruction": "解释字典", "input": "", "output": "用{}表示\n空字典，\\"}\\"是右括号"}\n'
            '{"instruction": "算", "output": 42}')
    assert parse_reply(text) == [
        {"instruction": "解释字典", "input": "", "output": '用{}表示\n空字典，"}"是右括号'},
        {"instruction": "算", "input": "", "output": "42"},
    ]


@pytest.mark.parametrize("item, reason", [
    (None, "malformed"),
    ({"instruction": "", "input": "", "output": "x"}, "empty_instruction"),
    ({"instruction": "写诗", "input": "", "output": ""}, "empty_output"),
    ({"instruction": "诗", "input": "", "output": "好"}, "too_short"),
    ({"instruction": "写诗", "input": "", "output": "长" * (MAX_OUTPUT_CHARS + 1)}, "too_long"),
    ({"instruction": "写" * 501, "input": "", "output": "好"}, "too_long"),
    ({"instruction": "写诗", "input": "", "output": "长" * MAX_OUTPUT_CHARS}, None),
])
def test_check_item(item, reason):
    assert check_item(item) == reason


# --------------------------------------------------------------------------------------------
# Character ROUGE-L


def lcs_reference(a: str, b: str) -> int:
    row = [0] * (len(b) + 1)
    for ca in a:
        prev_diag = 0
        for j, cb in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if ca == cb else max(row[j], row[j - 1])
    return row[-1]


def test_rouge_l_values():
    assert rouge_l("写一首关于春天的诗", "写一首关于春天的诗") == 1.0
    assert rouge_l("abc", "xyz") == 0.0
    assert rouge_l("abcde", "ace") == 0.75  # LCS 3: 2·3 / (5 + 3)
    assert rouge_l("今天天气很好", "今天天气不好") == pytest.approx(10 / 12)  # LCS 今天天气好
    assert rouge_l("请写一首诗", "诗一首写请") == pytest.approx(4 / 10)  # reversed: LCS 一首
    assert rouge_l("Hello, World!", "hello world") == 1.0  # case, spaces and punctuation ignored
    assert rouge_l("写诗。", "写诗？") == 1.0
    assert rouge_l("", "写诗") == 0.0 and rouge_l("？！", "写诗") == 0.0


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        alphabet = "abcd" if rng.random() < 0.5 else "春夏秋冬天地人和abc"
        a = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 90)))  # beyond 64 bits too
        b = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 90)))
        assert lcs_length(a, b) == lcs_reference(a, b), (a, b)


def test_dedup_index_threshold_is_strict():
    index = DedupIndex(0.7)
    index.add("abcdefghij")
    assert not index.is_duplicate("abcdefgxyz")  # ROUGE-L exactly 0.7 is kept, as in Stanford Alpaca
    assert index.is_duplicate("abcdefghxy")  # 0.8
    assert index.is_duplicate("ABCDEFGHIJ!")
    assert not index.is_duplicate("klmnopqrst")
    assert not index.is_duplicate("？？")


def random_instructions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    common = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会"
    texts = []
    for _ in range(count):
        if texts and rng.random() < 0.2:  # a near copy of an earlier one
            chars = list(rng.choice(texts))
            for _ in range(rng.randrange(0, 6)):
                chars[rng.randrange(len(chars))] = rng.choice(common)
            texts.append("".join(chars))
        else:
            length = rng.randrange(8, 30)
            chars = (rng.choice(common) if rng.random() < 0.3 else chr(0x4E00 + rng.randrange(3000))
                     for _ in range(length))
            texts.append("".join(chars))
    return texts


def test_dedup_index_agrees_with_brute_force():
    index = DedupIndex(0.7)
    kept: list[str] = []
    rejected = 0
    for text in random_instructions(400, seed=1):
        expected = any(rouge_l(text, other) > 0.7 for other in kept)
        assert index.is_duplicate(text) == expected, text
        if expected:
            rejected += 1
        else:
            index.add(text)
            kept.append(text)
    assert 30 < rejected < 120  # the near copies were there and were caught


def test_dedup_index_is_fast_for_thousands_of_items():
    texts = random_instructions(5000, seed=2)
    index = DedupIndex(0.7)
    started = time.perf_counter()
    for text in texts:
        if not index.is_duplicate(text):
            index.add(text)
    assert time.perf_counter() - started < 5  # about 0.3 s here; brute-force LCS takes minutes
    assert 3500 < len(index) < 4500


# --------------------------------------------------------------------------------------------
# Whole crawls against the scripted server


def test_messy_replies_give_exact_counts_and_no_duplicates(tmp_path):
    script = ["json", "fenced", "trailing_comma", "ndjson", "prose", "partial", "malformed", "invalid", "dup",
              "no_usage"]
    out = tmp_path / "data" / "set.jsonl"
    with FakeChatServer(api_key=KEY, script=script) as server:
        stats = run(server, out, 10, concurrency=3, items_per_request=4, price_in=2.0, price_out=8.0)
        served = {item["instruction"] for item in server.served}
        assert server.requests == 10

    # 6 full replies of 4, 3 from the cut-off one, 1 each from "invalid" and "dup"
    assert stats["requests"] == {"total": 10, "ok": 10, "failed": 0, "retried": 0, "remaining": 0}
    assert stats["items"] == {
        "parsed": 37, "accepted": 29, "rejected": 8, "duplicate": 3, "in_jsonl": 29,
        "rejected_by_reason": {"malformed": 2, "empty_instruction": 1, "empty_output": 1, "too_short": 0,
                               "too_long": 1, "duplicate": 3},
    }
    assert stats["tokens"] == {"prompt": 900, "completion": 450, "total": 1350}  # one reply had no usage
    assert stats["cost_usd"] == pytest.approx((900 * 2 + 450 * 8) / 1e6)
    assert json.loads((tmp_path / "data" / "set.stats.json").read_text()) == stats

    items = read_jsonl(out)
    assert len(items) == 29
    assert json.loads((tmp_path / "data" / "set.json").read_text("utf-8")) == items
    assert all(set(item) == {"instruction", "input", "output"} for item in items)
    assert_no_near_duplicates(items)
    # every kept item was served (the near copy only if it arrived before its original)
    assert sum(item["instruction"] in served for item in items) >= 28
    raw = read_jsonl(tmp_path / "data" / "set.raw.jsonl")
    assert sorted(r["index"] for r in raw) == list(range(10))


def test_retries_honour_retry_after_and_count(tmp_path):
    script = ["429:1", "500", "timeout", "drop"]
    with FakeChatServer(api_key=KEY, script=script, hang=1.5) as server:
        started = time.monotonic()
        stats = run(server, tmp_path / "r.jsonl", 3, concurrency=1, items_per_request=2, timeout=0.5)
        elapsed = time.monotonic() - started
        assert server.requests == 7
    assert stats["requests"] == {"total": 3, "ok": 3, "failed": 0, "retried": 4, "remaining": 0}
    assert stats["items"]["accepted"] == 6
    assert 1.0 <= elapsed < 6  # waited the 1 s the 429 asked for, and the 0.5 s timeout
    assert [r["attempts"] for r in read_jsonl(tmp_path / "r.raw.jsonl")] == [5, 1, 1]


def test_failed_requests_are_reported_and_retried_by_the_next_run(tmp_path):
    out = tmp_path / "f.jsonl"
    with FakeChatServer(api_key=KEY, script=["400", "500", "500", "500"]) as server:
        with pytest.raises(LlamaforgeError, match="2 of 3 requests have no reply"):
            run(server, out, 3, concurrency=1, items_per_request=4, max_retries=2)
        assert server.requests == 5  # 400 is not retried; 500 three times, then given up
        stats = json.loads((tmp_path / "f.stats.json").read_text())
        assert stats["requests"] == {"total": 3, "ok": 1, "failed": 2, "retried": 2, "remaining": 2}
        assert len(json.loads((tmp_path / "f.json").read_text("utf-8"))) == 4

        server.reset_counts()
        stats = run(server, out, 3, concurrency=1, items_per_request=4, max_retries=2)
        assert server.requests == 2
        assert server.prompts == [build_prompt(0, 0, 4), build_prompt(0, 1, 4)]
    assert stats["requests"] == {"total": 3, "ok": 3, "failed": 0, "retried": 0, "remaining": 0}
    assert stats["items"]["accepted"] == 12 and len(read_jsonl(out)) == 12


def test_restart_repairs_torn_lines_and_writes_items_a_kill_left_out(tmp_path):
    out = tmp_path / "t.jsonl"
    raw = tmp_path / "t.raw.jsonl"
    with FakeChatServer(api_key=KEY) as server:
        run(server, out, 3, items_per_request=4)
        complete = out.read_text("utf-8").splitlines(keepends=True)
        # As if killed after the last raw record but during its items, and during a new record.
        out.write_text("".join(complete[:-2]) + '{"instruction": "半', "utf-8")
        with open(raw, "a", encoding="utf-8") as f:
            f.write('{"index": 3, "seed": 0, "items_per_')
        server.reset_counts()
        stats = run(server, out, 4, items_per_request=4)
        assert server.requests == 1
        assert server.prompts == [build_prompt(0, 3, 4)]
    lines = out.read_text("utf-8").splitlines(keepends=True)
    assert lines[:12] == complete and len(lines) == 16
    assert sorted(r["index"] for r in read_jsonl(raw)) == [0, 1, 2, 3]
    assert stats["items"]["accepted"] == 16 and stats["items"]["in_jsonl"] == 16


def test_resume_refuses_another_seed_and_a_second_writer(tmp_path):
    out = tmp_path / "s.jsonl"
    with FakeChatServer(api_key=KEY) as server:
        run(server, out, 1, items_per_request=2)
        with pytest.raises(LlamaforgeError, match="--seed 0"):
            run(server, out, 2, items_per_request=2, seed=1)
        with open(tmp_path / "s.raw.jsonl", "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            with pytest.raises(LlamaforgeError, match="another crawl"):
                run(server, out, 2, items_per_request=2)
        assert server.requests == 1
    with pytest.raises(LlamaforgeError, match="must be a .jsonl"):
        crawl(tmp_path / "s.json", 1, api_key=KEY)


def test_missing_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LlamaforgeError, match="OPENAI_API_KEY is not set"):
        crawl(tmp_path / "k.jsonl", 1, base_url="http://127.0.0.1:9/v1", progress=False)
    assert not (tmp_path / "k.raw.jsonl").exists()


def test_rejected_key_stops_the_run_without_printing_it(tmp_path):
    wrong = "sk-WRONG-secret-4242"
    out = tmp_path / "a.jsonl"
    with FakeChatServer(api_key=KEY) as server:  # answers 401 and echoes the key it got
        proc = subprocess.run(cli_args(server, out, 8, "--concurrency", "4"), env=cli_env(wrong),
                              capture_output=True, text=True, timeout=60)
        assert server.requests <= 4
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("llamaforge: error:") and "HTTP 401" in last and "OPENAI_API_KEY" in last
    assert_key_nowhere(wrong, tmp_path, proc.stdout, proc.stderr)


def test_sigkill_then_restart_loses_nothing_and_asks_only_the_rest(tmp_path):
    n, k = 16, 3
    out = tmp_path / "data" / "run.jsonl"
    raw = tmp_path / "data" / "run.raw.jsonl"
    logs = tmp_path / "logs"
    logs.mkdir()
    with FakeChatServer(api_key=KEY, latency=0.25, script=["429", "500"]) as server:
        args = cli_args(server, out, n, "--concurrency", "2", "--items-per-request", str(k), "--seed", "5")
        with open(logs / "first.log", "w") as log:
            proc = subprocess.Popen(args, env=cli_env(KEY), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not raw.exists() or raw.read_bytes().count(b"\n") < 4):
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        done = {json.loads(line)["index"] for line in raw.read_text("utf-8").splitlines() if line.endswith("}")}
        assert 4 <= len(done) < n
        first_items = [line for line in out.read_text("utf-8").splitlines() if line.endswith("}")]

        server.reset_counts()
        with open(logs / "second.log", "w") as log:
            proc = subprocess.run(args, env=cli_env(KEY), stdout=log, stderr=subprocess.STDOUT, timeout=60)
        assert proc.returncode == 0, (logs / "second.log").read_text()
        assert server.requests == n - len(done)
        assert sorted(server.prompts) == sorted(build_prompt(5, i, k) for i in range(n) if i not in done)

    assert sorted(r["index"] for r in read_jsonl(raw)) == list(range(n))
    items = read_jsonl(out)
    assert len(items) == n * k
    assert set(first_items) <= set(out.read_text("utf-8").splitlines())
    assert_no_near_duplicates(items)
    assert json.loads((tmp_path / "data" / "run.json").read_text("utf-8")) == items
    stats = json.loads((tmp_path / "data" / "run.stats.json").read_text())
    assert stats["requests"]["ok"] == n and stats["requests"]["remaining"] == 0
    assert stats["items"]["accepted"] == n * k and stats["tokens"]["prompt"] == 100 * n
    assert_key_nowhere(KEY, tmp_path)


def test_sigterm_stops_between_replies_and_writes_outputs(tmp_path):
    out = tmp_path / "term.jsonl"
    raw = tmp_path / "term.raw.jsonl"
    with FakeChatServer(api_key=KEY, latency=0.25) as server:
        args = cli_args(server, out, 20, "--concurrency", "2", "--items-per-request", "2")
        proc = subprocess.Popen(args, env=cli_env(KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not raw.exists() or raw.read_bytes().count(b"\n") < 2):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and stderr.rstrip().endswith("llamaforge: interrupted")
    done = len(read_jsonl(raw))
    stats = json.loads((tmp_path / "term.stats.json").read_text())
    assert 2 <= done < 20
    assert stats["requests"]["ok"] == done and stats["requests"]["remaining"] == 20 - done
    assert len(read_jsonl(out)) == 2 * done == len(json.loads((tmp_path / "term.json").read_text("utf-8")))


# --------------------------------------------------------------------------------------------
# 200 replies that are no chat completion


def test_non_completion_200s_are_retried_and_never_recorded_as_done(tmp_path):
    out = tmp_path / "h.jsonl"
    # a proxy's HTML page, a JSON object without choices, an empty message: each a failed attempt
    with FakeChatServer(api_key=KEY, script=["html", "nochoices", "empty"]) as server:
        stats = run(server, out, 2, concurrency=1, items_per_request=3, max_retries=5)
        assert server.requests == 5
    assert stats["requests"] == {"total": 2, "ok": 2, "failed": 0, "retried": 3, "remaining": 0}
    assert [r["attempts"] for r in read_jsonl(tmp_path / "h.raw.jsonl")] == [4, 1]
    assert all(r["content"] for r in read_jsonl(tmp_path / "h.raw.jsonl"))
    assert stats["items"]["accepted"] == 6


def test_a_crawl_against_an_html_server_then_a_good_one_answers_every_request(tmp_path):
    out = tmp_path / "p.jsonl"
    with FakeChatServer(api_key=KEY, script=["html"] * 12) as server:  # every answer an HTML page
        with pytest.raises(LlamaforgeError, match="3 of 3 requests have no reply"):
            run(server, out, 3, concurrency=2, items_per_request=2, max_retries=3)
        assert server.requests == 12
    assert read_jsonl(tmp_path / "p.raw.jsonl") == []  # nothing recorded as done
    with FakeChatServer(api_key=KEY) as server:
        stats = run(server, out, 3, concurrency=2, items_per_request=2)
        assert server.requests == 3  # the rerun sends all three again
    assert stats["requests"]["remaining"] == 0
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "p.raw.jsonl")) == [0, 1, 2]
    assert len(read_jsonl(out)) == 6


def test_a_reply_that_echoes_the_key_is_stored_redacted(tmp_path):
    out = tmp_path / "k.jsonl"
    with FakeChatServer(api_key=KEY, script=["echo_key"]) as server:
        stats = run(server, out, 1, items_per_request=2)
    assert stats["items"]["accepted"] == 2
    for path in tmp_path.iterdir():
        assert KEY.encode() not in path.read_bytes(), path
    assert "Your key *** was accepted" in read_jsonl(tmp_path / "k.raw.jsonl")[0]["content"]
