"""Instruction files: plain text (one instruction a line), or Alpaca JSON / JSONL records
(instruction + input)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlamaforgeError
from ..files.reading import read_text

#: inference_hf.py's sample instruction, used when no data file is given.
SAMPLE_DATA = ["为什么要减少污染，保护环境？"]


@dataclass
class Example:
    instruction: str
    input: str = ""


def _record(obj, path, where) -> Example:
    if isinstance(obj, str):
        text = obj.strip()
        if not text:
            raise LlamaforgeError(f"{where}: empty instruction", path, "remove the empty entry")
        return Example(text)
    if not isinstance(obj, dict):
        raise LlamaforgeError(f"{where}: expected an object with 'instruction' (and 'input'), got "
                              f"{type(obj).__name__}", path, "write Alpaca records: {\"instruction\": ..., \"input\": ...}")
    instruction = obj.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise LlamaforgeError(f"{where}: record has no 'instruction' text", path,
                              "give every record a non-empty \"instruction\" string")
    inp = obj.get("input") or ""
    if not isinstance(inp, str):
        raise LlamaforgeError(f"{where}: 'input' is {type(inp).__name__}, not text", path,
                              "make \"input\" a string (or leave it out)")
    return Example(instruction.strip(), inp.strip())


def read_examples(path: str | os.PathLike, text: str | None = None) -> list[Example]:
    """Instructions from a text file (one a line), a JSON list of Alpaca records, or JSONL records.

    The format is chosen by the suffix: `.json`, `.jsonl`, anything else is text. Blank lines are
    skipped. `text`, when given, is the file's content already read (a bundled file).
    """
    p = Path(path)
    if text is None:
        text = read_text(p, "instruction file")
    suffix = p.suffix.lower()
    examples: list[Example] = []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlamaforgeError(f"invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})", p,
                                  "fix the JSON, or use .jsonl for one record a line / .txt for one instruction a line") from None
        except RecursionError:
            raise LlamaforgeError("invalid JSON (nested too deeply)", p, "write a list of Alpaca records") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise LlamaforgeError("JSON file is not a list of records", p, "write a list of Alpaca records")
        examples = [_record(obj, p, f"record {i}") for i, obj in enumerate(data)]
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise LlamaforgeError(f"line {n} is not JSON ({getattr(e, 'msg', 'nested too deeply')})", p,
                                      "write one JSON record a line") from None
            examples.append(_record(obj, p, f"line {n}"))
    else:
        examples = [Example(line.strip()) for line in text.splitlines() if line.strip()]
    if not examples:
        raise LlamaforgeError("no instruction in the file", p, "write at least one instruction")
    return examples
