"""The crawl's files on disk, for `--output F.jsonl`:

    F.raw.jsonl   one line per finished request: its index, the reply text, token usage,
                  attempts and what became of its items. The record of what was paid for.
    F.jsonl       accepted items, one {instruction, input, output} a line, in arrival order.
    F.json        the Alpaca JSON list (rewritten atomically at the end of every run).
    F.stats.json  totals over all runs (rewritten atomically at the end of every run).

This module holds their names (output_paths), the append-only store of replies and items
(_Store: resume, repair, recovery, dedup of what it keeps), the totals over the raw records, and
the judgements of which existing files are the crawl's own (_items_are_ours, _alpaca_is_ours).

Durability. Replies are handled one at a time on the event loop thread with no await in
between: the raw record is written and fsynced, then the reply's items are appended and fsynced.
So a kill can interrupt at most the last reply's items; a restart trims a torn last line,
re-derives that reply's missing items from its raw record, and sends only the requests whose
index has no raw record. The prompt of request i depends only on the seed, i and the items per
request, so a resumed run asks exactly the prompts that were never answered.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlamaforgeError
from ..files.guard import owned_by, register_output_kind
from .dedup import DedupIndex
from .replies import REJECT_REASONS, Item, _count, check_item, parse_reply

log = logging.getLogger(__package__)  # "llamaforge.crawl", as one logger for the whole crawl


def output_paths(output: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
    """(items .jsonl, raw .raw.jsonl, Alpaca .json, stats .stats.json) for an output F.jsonl."""
    items = Path(output)
    if items.suffix != ".jsonl":
        raise LlamaforgeError("the output must be a .jsonl file", items, "name it like data/instructions/NAME.jsonl")
    base = items.with_suffix("")
    return items, Path(f"{base}.raw.jsonl"), Path(f"{base}.json"), Path(f"{base}.stats.json")


def _peek_jsonl(path: Path) -> list | None:
    """The whole records of a JSONL file, read only (a torn last line ignored); None if unreadable."""
    try:
        data = path.read_bytes()
        return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, RecursionError):
        return None


_ITEM_FIELDS = frozenset({"instruction", "input", "output"})


def _first_record(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


@owned_by("crawl_raw", "crawl reply file")
def _raw_is_ours(path: Path) -> bool:
    """The append-only reply file is the crawl's by its first line (a later one may be torn by a kill)."""
    r = _first_record(path)
    return isinstance(r, dict) and {"index", "seed", "items_per_request", "content"} <= r.keys()


@owned_by("crawl_items", "crawl items file")
def _items_are_ours(path: Path) -> bool:
    """The items file is the crawl's when the reply file beside it is (each accepted item is written
    after the reply it came from, so a crawl's items never exist without its replies) and it holds
    items (its first line; a later bad line is named by the resume). A user's instruction data,
    however alike, has no reply file of llamaforge's beside it."""
    _, raw, _, _ = output_paths(path)
    first = _first_record(path)
    return raw.is_file() and _raw_is_ours(raw) and isinstance(first, dict) and set(first) <= _ITEM_FIELDS


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


# the Alpaca JSON is judged against its items file, which only the crawl knows: crawl/run.py passes
# guard_output's own=_alpaca_is_ours; no mark of its own
register_output_kind("alpaca", "Alpaca JSON of this crawl's items", lambda p: False)


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
