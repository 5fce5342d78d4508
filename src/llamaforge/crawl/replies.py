"""Reply parsing: the candidate items in a reply's text, read tolerantly, and the checks an item
must pass to be kept (bounds, empty fields); also what a reply may be stored as (storable text,
whole-number counts)."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

# Item bounds, in characters. Replies asked for inputs under ~120 and outputs under ~512
# characters; the upper bounds only catch runaway or concatenated answers.
MIN_INSTRUCTION_CHARS = 2
MAX_INSTRUCTION_CHARS = 500
MAX_INPUT_CHARS = 2000
MAX_OUTPUT_CHARS = 4000

# Why an item was not kept. Every parsed candidate is either accepted or counted under one.
REJECT_REASONS = ("malformed", "empty_instruction", "empty_output", "too_short", "too_long", "duplicate")


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


def _count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
