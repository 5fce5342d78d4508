"""Alpaca-format instruction data from any OpenAI-compatible chat API.

The recipe is Chinese-LLaMA-Alpaca's `crawl_prompt.py` (a Chinese prompt naming 10 sampled
topics and 10 sampled task types, with randomized length limits), made reproducible, concurrent
and resumable:

    prompt(seed, i) -> chat completion (own retry loop) -> tolerant parse -> validate
                    -> near-duplicate check (character ROUGE-L) -> append to F.jsonl

Files, for `--output F.jsonl`:

    F.raw.jsonl   one line per finished request: its index, the reply text, token usage,
                  attempts and what became of its items. The record of what was paid for.
    F.jsonl       accepted items, one {instruction, input, output} a line, in arrival order.
    F.json        the Alpaca JSON list (rewritten atomically at the end of every run).
    F.stats.json  totals over all runs (rewritten atomically at the end of every run).

Durability. Replies are handled one at a time on the event loop thread with no await in
between: the raw record is written and fsynced, then the reply's items are appended and fsynced.
So a kill can interrupt at most the last reply's items; a restart trims a torn last line,
re-derives that reply's missing items from its raw record, and sends only the requests whose
index has no raw record. The prompt of request i depends only on the seed, i and the items per
request, so a resumed run asks exactly the prompts that were never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import functools
import json
import logging
import os
import random
import re
import signal
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np
import openai
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .errors import LlamaforgeError
from .fsutil import _OWN, _first_record, guard_output, owned_by, write_json
from . import defaults as D
from .tokenizer import bundled_text

log = logging.getLogger(__name__)

CRAWL_STATS = "crawl"  # the "llamaforge" value of the crawl's stats file

DEFAULT_MODEL = "gpt-4o-mini"

# Item bounds, in characters. Replies asked for inputs under ~120 and outputs under ~512
# characters; the upper bounds only catch runaway or concatenated answers.
MIN_INSTRUCTION_CHARS = 2
MAX_INSTRUCTION_CHARS = 500
MAX_INPUT_CHARS = 2000
MAX_OUTPUT_CHARS = 4000

# Why an item was not kept. Every parsed candidate is either accepted or counted under one.
REJECT_REASONS = ("malformed", "empty_instruction", "empty_output", "too_short", "too_long", "duplicate")

# Retry timing: exponential backoff from `backoff` seconds, doubled per attempt up to
# BACKOFF_CAP, times a jitter in [0.5, 1]; a server's Retry-After wins, up to MAX_RETRY_AFTER.
BACKOFF_CAP = 60.0
MAX_RETRY_AFTER = 300.0

# Status codes worth another try, besides every 5xx (what the openai client itself retries).
_RETRYABLE_STATUS = frozenset({408, 409, 429})
# Status codes that would fail every request the same way: stop the run instead.
_FATAL_STATUS = {
    401: "set OPENAI_API_KEY to a key this server accepts",
    403: "use a key that is allowed to call this model",
    404: "check --model and --base-url (the URL usually ends in /v1)",
}


# --------------------------------------------------------------------------------------------
# Prompt


@functools.lru_cache(maxsize=1)
def _recipe() -> dict[str, Any]:
    return json.loads(bundled_text("crawl_prompt.json"))


def build_prompt(seed: int, index: int, items_per_request: int = 20) -> str:
    """The prompt of request `index`: a pure function of (seed, index, items_per_request)."""
    recipe = _recipe()
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and
    # Python versions (unlike hash()).
    rng = random.Random(f"llamaforge-crawl:{seed}:{index}")
    topics = "、".join(rng.sample(recipe["topics"], recipe["num_topics"]))
    tasks = "、".join(rng.sample(recipe["tasks"], recipe["num_tasks"]))
    input_limit = rng.randint(*recipe["input_limit"])
    output_limit = rng.randint(*recipe["output_limit"])
    return "\n".join(recipe["template"]).format(
        topics=topics, tasks=tasks, input_limit=input_limit, output_limit=output_limit, n=items_per_request
    )


# --------------------------------------------------------------------------------------------
# Tolerant parsing

Item = dict[str, str]

_FENCED = re.compile(r"```[A-Za-z]*[ \t]*\n(.*?)\n[ \t]*```", re.S)
_TRAILING_COMMA = re.compile(r",(\s*[\]}])")
_FIELD_NAMES = {
    "instruction": "instruction",
    "指令": "instruction",
    "input": "input",
    "输入": "input",
    "output": "output",
    "输出": "output",
    "response": "output",
    "回答": "output",
}
_FAILED = object()


def _loads_lenient(text: str) -> Any:
    """json.loads that allows raw newlines inside strings and trailing commas; _FAILED if not JSON."""
    for candidate in (text, _TRAILING_COMMA.sub(r"\1", text)):
        try:
            return json.loads(candidate, strict=False)
        except (ValueError, RecursionError):
            continue
    return _FAILED


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False)


def _item_from_dict(obj: dict) -> Item | None:
    fields: dict[str, str] = {}
    for key, value in obj.items():
        name = _FIELD_NAMES.get(str(key).strip().strip("<>").lower())
        if name and name not in fields:
            fields[name] = _as_text(value)
    if "instruction" not in fields and "output" not in fields:
        return None
    return {k: storable(fields.get(k, "")) for k in ("instruction", "input", "output")}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` as UTF-8 can store it: a lone surrogate (a JSON escape such as \\ud800 that pairs with
    nothing) becomes U+FFFD, as a strict decoder shows it; a reply holding one is kept, not fatal."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _items_from_value(value: Any) -> list[Item | None]:
    if isinstance(value, list):
        return [_item_from_dict(v) if isinstance(v, dict) else None for v in value]
    if isinstance(value, dict):
        item = _item_from_dict(value)
        if item is not None:
            return [item]
        # A wrapper such as {"data": [...]}: take its first list.
        for v in value.values():
            if isinstance(v, list):
                return _items_from_value(v)
    return [None]


def _object_spans(text: str) -> Iterator[str]:
    """Each outermost {...} in `text`, braces inside JSON strings ignored.

    Quotes only count inside an object, so prose between objects cannot confuse the scan. An
    object cut off by the end of the text (a reply stopped at max_tokens) is yielded as is.
    """
    depth = 0
    start = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if depth and in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif depth and ch == '"':
            in_string = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                yield text[start : i + 1]
    if depth:
        yield text[start:]


def parse_reply(text: str) -> list[Item | None]:
    """The candidate items in a reply; None stands for a fragment that could not be read.

    Accepts a JSON list or object, JSON inside ``` fences with prose around it, trailing
    commas, raw newlines in strings, one object per line, and objects embedded in prose. A
    reply with nothing readable yields [None], so it counts as one malformed item.
    """
    value = _loads_lenient(text.strip())
    if value is not _FAILED:
        return _items_from_value(value)
    blocks = [_loads_lenient(b) for b in _FENCED.findall(text)]
    if blocks and all(b is not _FAILED for b in blocks):
        return [item for b in blocks for item in _items_from_value(b)]
    found: list[Item | None] = []
    for span in _object_spans(text):
        value = _loads_lenient(span)
        found.extend([None] if value is _FAILED else _items_from_value(value))
    return found or [None]


def check_item(item: Item | None) -> str | None:
    """The reason to reject `item` (one of REJECT_REASONS, duplicates aside), or None."""
    if item is None:
        return "malformed"
    if not item["instruction"]:
        return "empty_instruction"
    if not item["output"]:
        return "empty_output"
    if len(item["instruction"]) < MIN_INSTRUCTION_CHARS:
        return "too_short"
    if (
        len(item["instruction"]) > MAX_INSTRUCTION_CHARS
        or len(item["input"]) > MAX_INPUT_CHARS
        or len(item["output"]) > MAX_OUTPUT_CHARS
    ):
        return "too_long"
    return None


# --------------------------------------------------------------------------------------------
# Character-level ROUGE-L


def normalize_for_rouge(text: str) -> str:
    """Lower-cased letters and digits only (CJK characters are letters): the units ROUGE-L
    compares. Word-based ROUGE would see a whole Chinese sentence as one token."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).lower() if ch.isalnum())


def _char_masks(a: str) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    return masks


def _lcs_from_masks(masks: dict[str, int], m: int, b: str) -> int:
    # Bit-parallel LCS (Allison & Dix 1986; Hyyrö 2004): bit j of v is cleared once a[:j+1]
    # gains a match; one pass over b, a few big-int operations per character.
    full = (1 << m) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings."""
    if not a or not b:
        return 0
    return _lcs_from_masks(_char_masks(a), len(a), b)


def rouge_l(a: str, b: str) -> float:
    """Character-level ROUGE-L F-measure, 2·LCS / (len(a) + len(b)), on normalized text."""
    a, b = normalize_for_rouge(a), normalize_for_rouge(b)
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class DedupIndex:
    """The instructions collected so far, for near-duplicate checks (ROUGE-L > threshold).

    Exact LCS against thousands of instructions per new item is too slow in Python, so each
    instruction also keeps a histogram of its characters hashed into _BUCKETS bins. Summing
    min(count_a, count_b) over bins bounds the LCS from above (hash collisions only raise it),
    and one numpy pass discards every instruction whose bound cannot pass the threshold; the
    exact LCS runs only for the few that remain.
    """

    _BUCKETS = 256

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self._texts: list[str] = []
        self._lengths = np.zeros(1024, dtype=np.int64)
        # Column j is the histogram of instruction j; stored bin-major so that gathering the
        # few bins of a new instruction reads contiguous rows.
        self._hist = np.zeros((self._BUCKETS, 1024), dtype=np.uint16)

    def __len__(self) -> int:
        return len(self._texts)

    def _histogram(self, text: str) -> np.ndarray:
        codes = np.fromiter((ord(ch) % self._BUCKETS for ch in text), dtype=np.int64, count=len(text))
        return np.bincount(codes, minlength=self._BUCKETS)

    def is_duplicate(self, instruction: str) -> bool:
        text = normalize_for_rouge(instruction)
        n = len(self._texts)
        if not text or not n:
            return False
        hist = self._histogram(text)
        bins = np.flatnonzero(hist)
        bound = np.minimum(self._hist[bins, :n], hist[bins, None]).sum(axis=0)
        # rouge <= 2·bound / (m + n_j); keep the ties, the exact test below decides them.
        candidates = np.flatnonzero(2 * bound >= self.threshold * (len(text) + self._lengths[:n]))
        if not len(candidates):
            return False
        masks = _char_masks(text)
        for j in candidates:
            other = self._texts[j]
            if 2 * _lcs_from_masks(masks, len(text), other) / (len(text) + len(other)) > self.threshold:
                return True
        return False

    def add(self, instruction: str) -> None:
        text = normalize_for_rouge(instruction)
        n = len(self._texts)
        if n == self._lengths.shape[0]:
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
            self._hist = np.concatenate([self._hist, np.zeros_like(self._hist)], axis=1)
        self._texts.append(text)
        self._lengths[n] = len(text)
        self._hist[:, n] = np.minimum(self._histogram(text), np.iinfo(np.uint16).max)


# --------------------------------------------------------------------------------------------
# Files: raw replies and accepted items


def _peek_jsonl(path: Path) -> list | None:
    """The whole records of a JSONL file, read only (a torn last line ignored); None if unreadable."""
    try:
        data = path.read_bytes()
        return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, RecursionError):
        return None


_ITEM_FIELDS = frozenset({"instruction", "input", "output"})


@owned_by("crawl_items", "crawl items file")
def _items_are_ours(path: Path) -> bool:
    """The items file is the crawl's when the reply file beside it is (each accepted item is written
    after the reply it came from, so a crawl's items never exist without its replies) and it holds
    items (its first line; a later bad line is named by the resume). A user's instruction data,
    however alike, has no reply file of llamaforge's beside it."""
    _, raw, _, _ = output_paths(path)
    first = _first_record(path)
    return raw.is_file() and _OWN["crawl_raw"][1](raw) and isinstance(first, dict) and set(first) <= _ITEM_FIELDS


def alpaca_of(items: list[dict]) -> list[dict]:
    """The Alpaca JSON of the crawl's items (instruction, input, output; missing ones empty)."""
    return [{"instruction": r.get("instruction", ""), "input": r.get("input", ""), "output": r.get("output", "")}
            for r in items]


def _alpaca_is_ours(path: Path, items_path: Path) -> bool:
    """The Alpaca JSON is the crawl's when it is the Alpaca form of the first N records of the crawl's
    own items file (the items file only grows; a run killed before it rewrote the JSON leaves it
    behind by some items), or else holds only items of the crawl's replies (a kill that cut items
    off the items file, which the resume recovers from the replies). Nothing else is: a user's data
    never is, and if it were, it is all in the crawl's own files."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(data, list):
        return False
    ours = items_path.is_file() and _items_are_ours(items_path)
    items = (_peek_jsonl(items_path) if ours else []) or []
    if len(data) <= len(items) and data == alpaca_of(items[:len(data)]):
        return True
    _, raw, _, _ = output_paths(items_path)
    if not (ours and all(isinstance(r, dict) for r in data)):
        return False
    known = {tuple(r.get(k) for k in _ITEM_FIELDS_ORDER) for r in alpaca_of(items)}
    for record in _peek_jsonl(raw) or []:
        if isinstance(record, dict) and isinstance(record.get("content"), str):
            known |= {tuple(i[k] for k in _ITEM_FIELDS_ORDER) for i in parse_reply(record["content"]) if i}
    return all(tuple(r.get(k) for k in _ITEM_FIELDS_ORDER) in known for r in data)


_ITEM_FIELDS_ORDER = ("instruction", "input", "output")


def _read_jsonl(path: Path) -> tuple[list, Any]:
    """The records of a JSONL file we append to, read only, and its repair (None, or a function the
    caller runs once everything is checked): a last line without its line end is a record when it
    parses (a line end is added), else what a kill mid-write left (it is cut off). A complete record
    is never dropped, and nothing is changed before the caller knows the file is sound."""
    if not path.exists():
        return [], None
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    repair = None
    if data[end:].strip():
        try:
            json.loads(data[end:])
            end = len(data)
            data += b"\n"

            def repair():
                with open(path, "ab") as f:
                    f.write(b"\n")
        except (ValueError, RecursionError):
            def repair():
                log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
                with open(path, "r+b") as f:
                    f.truncate(end)
    records = []
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            raise LlamaforgeError(
                f"line {number} is not valid JSON", path,
                "delete that line (the crawl appends to this file and resumes from it)",
            ) from None
    return records, repair


def _fsync_write(f, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


@dataclass
class _Totals:
    """Counters summed over every raw record (all runs) plus this run's failures."""

    ok: int = 0
    retried: int = 0
    failed: int = 0
    parsed: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_record(self, record: dict) -> None:
        self.ok += 1
        self.retried += record["attempts"] - 1
        counts = record["counts"]
        self.parsed += counts["parsed"]
        self.accepted += counts["accepted"]
        for reason in REJECT_REASONS:
            self.rejected[reason] += counts.get(reason, 0)
        usage = record.get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens") or 0
        self.completion_tokens += usage.get("completion_tokens") or 0


_RAW_FIELDS = frozenset({"index", "seed", "items_per_request", "attempts", "usage", "counts", "content"})


def _raw_record_problem(record) -> str | None:
    """What makes `record` no reply record as add_reply writes it (every field of its type), or None."""
    if not isinstance(record, dict):
        return "not an object"
    missing = sorted(_RAW_FIELDS - record.keys())
    if missing:
        return f"no {missing[0]!r}"
    for key in ("index", "seed", "items_per_request", "attempts"):
        if not _count(record[key]):
            return f"{key} must be a whole number, 0 or more"
    counts, usage = record["counts"], record["usage"]
    if not (isinstance(counts, dict) and {"parsed", "accepted"} <= counts.keys()
            and all(_count(v) for v in counts.values())):
        return "counts must be an object of whole numbers with 'parsed' and 'accepted'"
    if usage is not None and not (isinstance(usage, dict) and all(v is None or _count(v) for v in usage.values())):
        return "usage must be null or an object of token counts"
    if not isinstance(record["content"], str):
        return "content must be a string"
    return None


class _Store:
    """The crawl's two append-only files, opened for resuming, the items written to them and the
    dedup index over those."""

    def __init__(self, items_path: Path, raw_path: Path, seed: int, items_per_request: int, threshold: float):
        self.items_path = items_path
        self.raw_path = raw_path
        self.seed = seed
        self.items_per_request = items_per_request
        self.dedup = DedupIndex(threshold)
        self.totals = _Totals()
        self.done: set[int] = set()
        self.items: list[dict] = []  # the records of the items file, as written

        items_path.parent.mkdir(parents=True, exist_ok=True)
        new = not raw_path.exists()
        self._raw = open(raw_path, "a+", encoding="utf-8")
        try:
            # One writer per output: a second crawl on the same files would interleave them.
            fcntl.flock(self._raw, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._raw.close()
            raise LlamaforgeError(
                "another crawl is writing to this output", raw_path, "wait for it to finish or choose another --output"
            ) from None
        try:
            self._resume()
            self._items = open(items_path, "a", encoding="utf-8")
        except BaseException:
            self._raw.close()
            if new:  # refused before anything was written: the reply file this made goes again
                with contextlib.suppress(OSError):
                    raw_path.unlink()
            raise

    def _resume(self) -> None:
        """Read both files, check every record, and only then repair a torn last line (a refused
        store is left as it was)."""
        records, raw_repair = _read_jsonl(self.raw_path)
        for number, record in enumerate(records, 1):
            problem = _raw_record_problem(record)
            if problem:
                raise LlamaforgeError(
                    f"line {number} is not a reply record of llamaforge's crawl ({problem})", self.raw_path,
                    "move this file away, or choose another --output",
                )
            if (record.get("seed"), record.get("items_per_request")) != (self.seed, self.items_per_request):
                raise LlamaforgeError(
                    f"this crawl was started with --seed {record.get('seed')} and --items-per-request "
                    f"{record.get('items_per_request')}, which decide every prompt", self.raw_path,
                    "resume with the same values, or choose another --output for a new crawl",
                )
            if record["index"] not in self.done:
                self.done.add(record["index"])
                self.totals.add_record(record)
        self.items, items_repair = _read_jsonl(self.items_path)
        for number, item in enumerate(self.items, 1):
            if not (isinstance(item, dict) and set(item) <= _ITEM_FIELDS
                    and all(isinstance(v, str) for v in item.values())):
                raise LlamaforgeError(f"line {number} is not an item of llamaforge's crawl (an object of instruction, "
                                      "input and output strings)", self.items_path,
                                      "delete that line, or choose another --output")
        for repair in (raw_repair, items_repair):
            if repair is not None:
                repair()
        for item in self.items:
            self.dedup.add(item.get("instruction", ""))
        if records:
            self._recover(records[-1], {item.get("instruction") for item in self.items})

    def _recover(self, last: dict, present: set[str | None]) -> None:
        # Only the newest raw record can have lost items to a kill (see the module docstring).
        # Re-running its reply through the same checks, with the items already in the file
        # skipped, appends exactly the ones that were accepted but not written.
        missing = [
            item for item in parse_reply(last["content"])
            if check_item(item) is None and item["instruction"] not in present and self._accept(item)
        ]
        if missing:
            with open(self.items_path, "a", encoding="utf-8") as f:
                _fsync_write(f, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in missing))
            self.items.extend(missing)
            log.info("recovered %d items of request %d that an interrupted run had not written",
                     len(missing), last["index"])

    def _accept(self, item: Item) -> bool:
        if self.dedup.is_duplicate(item["instruction"]):
            return False
        self.dedup.add(item["instruction"])
        return True

    def add_reply(self, index: int, content: str, usage: dict | None, attempts: int, finish_reason: str | None) -> None:
        """Keep one finished reply: its raw record first, then its accepted items."""
        counts = dict.fromkeys(REJECT_REASONS, 0)
        accepted = []
        candidates = parse_reply(content)
        for item in candidates:
            reason = check_item(item)
            if reason is None and not self._accept(item):
                reason = "duplicate"
            if reason is None:
                accepted.append(item)
            else:
                counts[reason] += 1
        record = {
            "index": index, "seed": self.seed, "items_per_request": self.items_per_request,
            "attempts": attempts, "finish_reason": finish_reason, "usage": usage,
            "counts": {"parsed": len(candidates), "accepted": len(accepted), **counts},
            "content": content,
        }
        _fsync_write(self._raw, json.dumps(record, ensure_ascii=False) + "\n")
        if accepted:
            _fsync_write(self._items, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in accepted))
            self.items.extend(accepted)
        self.done.add(index)
        self.totals.add_record(record)

    def close(self) -> None:
        self._items.close()
        self._raw.close()  # releases the lock


# --------------------------------------------------------------------------------------------
# Requests


def _secret_pattern(secret: str) -> re.Pattern:
    """The key as it may appear in a reply's text: each character as itself or as a JSON escape
    (\\u0073, \\/), so that the key never survives into a file in decoded or escaped form."""
    def one(c: str) -> str:
        forms = [re.escape(c), re.escape(f"\\u{ord(c):04x}"), re.escape(f"\\u{ord(c):04X}")]
        if c == "/":
            forms.append(re.escape("\\/"))
        return "(?:" + "|".join(forms) + ")"
    return re.compile("".join(one(c) for c in secret))


def _redact(text, secret: str):
    if not secret or not isinstance(text, str):
        return text
    return _secret_pattern(secret).sub("***", text)


def _display_url(url: str | None) -> str:
    if not url:
        return "https://api.openai.com/v1 (default)"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def _retry_after(headers) -> float | None:
    """Seconds a server asked us to wait (Retry-After-Ms, or Retry-After in seconds or a date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


@dataclass
class _Settings:
    model: str
    seed: int
    items_per_request: int
    max_retries: int
    backoff: float
    api_key: str


async def _complete(client, s: _Settings, index: int):
    """One chat completion with retries: (completion, attempts), the completion None if it failed."""
    prompt = build_prompt(s.seed, index, s.items_per_request)
    attempt = 0
    while True:
        attempt += 1
        hint = None
        try:
            completion = await client.chat.completions.create(
                model=s.model, messages=[{"role": "user", "content": prompt}]
            )
            problem = _not_a_completion(completion)
            if problem is None:
                return completion, attempt
            problem, retryable = _redact(problem, s.api_key), True
        except openai.APIStatusError as e:
            problem = f"HTTP {e.status_code}: {_redact(str(e), s.api_key)[:300]}"
            if e.status_code in _FATAL_STATUS:  # would fail every request: stop the run
                raise LlamaforgeError(f"the server answered {problem}", fix=_FATAL_STATUS[e.status_code]) from None
            retryable = e.status_code in _RETRYABLE_STATUS or e.status_code >= 500
            hint = _retry_after(e.response.headers)
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            problem = "timed out" if isinstance(e, openai.APITimeoutError) else "connection error"
            retryable = True
        except openai.APIError as e:  # e.g. a 200 whose body is not valid JSON (a proxy's error page)
            problem = f"{type(e).__name__}: {_redact(str(e), s.api_key)[:300]}"
            retryable = True
        if not retryable or attempt > s.max_retries:
            log.warning("request %d failed after %d attempt(s): %s", index, attempt, problem)
            return None, attempt
        delay = hint if hint is not None else min(BACKOFF_CAP, s.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
        delay = min(delay, MAX_RETRY_AFTER)
        log.info("request %d: %s; retry %d/%d in %.1f s", index, problem, attempt, s.max_retries, delay)
        await asyncio.sleep(delay)


def _not_a_completion(completion) -> str | None:
    """Why a 200 reply is no chat completion (a proxy's HTML page arrives as a str, a JSON error
    object without choices, an empty message), or None when it is one."""
    if isinstance(completion, (str, bytes)):
        return f"the reply is not a chat completion but text: {str(completion)[:120]!r}"
    if not getattr(completion, "choices", None):
        return "the reply is not a chat completion (no choices)"
    content, _, _ = _reply_fields(completion)
    if not isinstance(content, str) or not content.strip():
        return "the reply's message is empty"
    return None


def _reply_fields(completion) -> tuple[str, dict | None, str | None]:
    """Content, usage and finish reason of a completion; servers may omit any of them."""
    choices = getattr(completion, "choices", None)
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None)
    content = storable(content) if isinstance(content, str) else ""
    usage = getattr(completion, "usage", None)
    usage_dict = None
    if usage is not None:  # the client does not check types: a count that is no count is unknown (0)
        usage_dict = {key: n if _count(n := getattr(usage, key, None)) else 0
                      for key in ("prompt_tokens", "completion_tokens")}
    finish = getattr(choice, "finish_reason", None)
    return content, usage_dict, storable(finish)[:40] if isinstance(finish, str) else None


def _count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


async def _run(store: _Store, todo: list[int], s: _Settings, client_args: dict, concurrency: int, progress) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    # SIGTERM (Snakemake or SLURM stopping the job) ends the run like Ctrl-C does: in-flight
    # requests are cancelled at an await, never half-way through writing a reply.
    try:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
        handles_sigterm = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
        handles_sigterm = False

    pending = iter(todo)  # shared by the workers: each index is taken by exactly one

    async def worker(client) -> None:
        for index in pending:
            completion, attempts = await _complete(client, s, index)
            if completion is None:
                store.totals.failed += 1
                store.totals.retried += attempts - 1
            else:
                content, usage, finish_reason = _reply_fields(completion)
                # a server that echoes the key must not get it written into the raw file
                store.add_reply(index, _redact(content, s.api_key), usage, attempts, _redact(finish_reason, s.api_key))
            progress.update(1)
            progress.set_postfix(items=store.totals.accepted, failed=store.totals.failed, refresh=False)

    try:
        async with openai.AsyncOpenAI(max_retries=0, **client_args) as client:
            workers = [asyncio.ensure_future(worker(client)) for _ in range(min(concurrency, len(todo)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
    finally:
        if handles_sigterm:
            loop.remove_signal_handler(signal.SIGTERM)


# --------------------------------------------------------------------------------------------
# Entry point


def output_paths(output: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
    """(items .jsonl, raw .raw.jsonl, Alpaca .json, stats .stats.json) for an output F.jsonl."""
    items = Path(output)
    if items.suffix != ".jsonl":
        raise LlamaforgeError("the output must be a .jsonl file", items, "name it like data/instructions/NAME.jsonl")
    base = items.with_suffix("")
    return items, Path(f"{base}.raw.jsonl"), Path(f"{base}.json"), Path(f"{base}.stats.json")


MAX_REQUESTS = 1_000_000  # 5 items each: 100 times the 52k of Stanford Alpaca


def check_api_key(key: str) -> None:
    """An HTTP header takes printable ASCII: a key with a line end (read from a CRLF file), a space or
    another character is one error here, without the key, instead of retried "connection errors"."""
    bad = next((c for c in key if not ("!" <= c <= "~")), None)
    if bad is not None:
        where = "at its end" if key.index(bad) == len(key) - 1 else "in it"
        raise LlamaforgeError(f"OPENAI_API_KEY holds the character {ascii(bad)} {where}, which no HTTP header can "
                              "carry", fix="set the key without line ends or spaces (e.g. export OPENAI_API_KEY="
                              "\"$(tr -d '\\r\\n ' < key.txt)\")")


def _check_settings(num_requests, concurrency, items_per_request, max_retries, timeout, backoff, dedup_threshold,
                    price_in, price_out) -> None:
    # written so that NaN fails every check (every comparison with NaN is false)
    problems = [
        (not 0 <= num_requests <= MAX_REQUESTS, f"--num-requests must be 0 to {MAX_REQUESTS:,}"),
        (not concurrency >= 1, "--concurrency must be at least 1"),
        (not items_per_request >= 1, "--items-per-request must be at least 1"),
        (not max_retries >= 0, "--max-retries must be 0 or more"),
        (not 0 < timeout < float("inf"), "--timeout must be a positive number of seconds"),
        (not 0 <= backoff < float("inf"), "--backoff must be 0 or more seconds"),
        (not 0 < dedup_threshold <= 1, "--dedup-threshold must be in (0, 1]"),
        (not (0 <= price_in < float("inf") and 0 <= price_out < float("inf")), "prices must be 0 or more"),
    ]
    for bad, message in problems:
        if bad:
            raise LlamaforgeError(message, fix="change the option or the crawl entry in config.yaml")


def crawl(
    output: str | os.PathLike,
    num_requests: int,
    *,
    concurrency: int = D.CRAWL_CONCURRENCY,
    model: str = DEFAULT_MODEL,
    base_url: str | None = None,
    items_per_request: int = D.CRAWL_ITEMS_PER_REQUEST,
    seed: int = D.CRAWL_SEED,
    max_retries: int = D.CRAWL_MAX_RETRIES,
    timeout: float = D.CRAWL_TIMEOUT,
    backoff: float = D.CRAWL_BACKOFF,
    dedup_threshold: float = D.CRAWL_DEDUP_THRESHOLD,
    alpaca_json: str | os.PathLike | None = None,
    price_in: float = D.CRAWL_PRICE,
    price_out: float = D.CRAWL_PRICE,
    api_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Crawl until requests 0..num_requests-1 all have a reply in the raw file; return the stats.

    The key is `api_key` or $OPENAI_API_KEY; the server is `base_url` or $OPENAI_BASE_URL or
    OpenAI's. Prices are USD per million prompt/completion tokens. The Alpaca JSON and stats
    are written at the end of every run, finished or not; a run with failed requests raises
    LlamaforgeError afterwards, and running it again retries them.
    """
    _check_settings(num_requests, concurrency, items_per_request, max_retries, timeout, backoff, dedup_threshold,
                    price_in, price_out)
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise LlamaforgeError(
            "OPENAI_API_KEY is not set",
            fix="export OPENAI_API_KEY=<your key> (any non-empty value for a local server that checks none)",
        )
    check_api_key(api_key)
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    items_path, raw_path, default_json, stats_path = output_paths(output)
    alpaca_path = Path(alpaca_json) if alpaca_json else default_json
    outputs = ((items_path, "crawl_items"), (raw_path, "crawl_raw"), (alpaca_path, "alpaca"), (stats_path, "crawl_stats"))
    resolved = [p.resolve() for p, _ in outputs]
    if len(set(resolved)) < len(resolved):
        raise LlamaforgeError("--alpaca-json is one of the crawl's own files (the .jsonl, .raw.jsonl or .stats.json)",
                              alpaca_path, "give the Alpaca JSON a name of its own, e.g. NAME.json beside NAME.jsonl")
    for path, kind in outputs:
        guard_output(path, kind, own=(lambda p: _alpaca_is_ours(p, items_path)) if kind == "alpaca" else None)

    store = _Store(items_path, raw_path, seed, items_per_request, dedup_threshold)
    settings = _Settings(model, seed, items_per_request, max_retries, backoff, api_key)
    todo = [i for i in range(num_requests) if i not in store.done]
    log.info("%s: %d of %d requests done, %d to go; model %s at %s, concurrency %d",
             items_path, num_requests - len(todo), num_requests, len(todo), model, _display_url(base_url),
             concurrency)
    started = time.monotonic()
    outcome = "interrupted"
    try:
        bar = tqdm(total=num_requests, initial=num_requests - len(todo), unit="req", desc="crawl",
                   file=sys.stderr, disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 10)
        with bar, logging_redirect_tqdm():
            if todo:
                client_args = {"api_key": api_key, "base_url": base_url, "timeout": timeout}
                asyncio.run(_run(store, todo, settings, client_args, concurrency, bar))
        outcome = "finished"
    except LlamaforgeError:
        outcome = "aborted"
        raise
    except asyncio.CancelledError:  # SIGTERM, see _run
        raise KeyboardInterrupt from None
    finally:
        store.close()
        stats = _write_outputs(store, alpaca_path, stats_path, num_requests, model, price_in, price_out,
                               time.monotonic() - started)
        _log_summary(stats, outcome)
    missing = stats["requests"]["remaining"]
    if missing:
        raise LlamaforgeError(
            f"{missing} of {num_requests} requests have no reply ({stats['requests']['failed']} failed in this run; "
            "the log says why)", raw_path, "run the same command again: finished requests are kept and not repeated",
        )
    return stats


def _write_outputs(store: _Store, alpaca_path: Path, stats_path: Path, num_requests: int,
                   model: str, price_in: float, price_out: float, seconds: float) -> dict[str, Any]:
    items = alpaca_of(store.items)
    write_json(alpaca_path, items)
    t = store.totals
    finished = len(store.done & set(range(num_requests)))
    stats = {
        "llamaforge": CRAWL_STATS,
        "model": model,
        "requests": {
            "total": num_requests,
            "ok": t.ok,
            "failed": t.failed,
            "retried": t.retried,
            "remaining": num_requests - finished,
        },
        "items": {
            "parsed": t.parsed,
            "accepted": t.accepted,
            "rejected": sum(t.rejected.values()),
            "duplicate": t.rejected["duplicate"],
            "rejected_by_reason": t.rejected,
            "in_jsonl": len(items),
        },
        "tokens": {
            "prompt": t.prompt_tokens,
            "completion": t.completion_tokens,
            "total": t.prompt_tokens + t.completion_tokens,
        },
        "cost_usd": round((t.prompt_tokens * price_in + t.completion_tokens * price_out) / 1e6, 6),
        "price_per_million_tokens": {"input": price_in, "output": price_out},
        "last_run_seconds": round(seconds, 3),
    }
    write_json(stats_path, stats)
    return stats


def _log_summary(stats: dict[str, Any], outcome: str) -> None:
    r, i, t = stats["requests"], stats["items"], stats["tokens"]
    reasons = ", ".join(f"{k} {v}" for k, v in i["rejected_by_reason"].items() if v) or "none"
    log.info(
        "crawl %s: requests %d/%d ok, %d failed, %d retries; items %d accepted, %d rejected (%s); "
        "tokens %d in + %d out, cost $%.4f",
        outcome, r["total"] - r["remaining"], r["total"], r["failed"], r["retried"], i["accepted"], i["rejected"],
        reasons, t["prompt"], t["completion"], stats["cost_usd"],
    )
    if r["remaining"]:
        log.info("%d requests have no reply yet: run the same command again to resume", r["remaining"])
