"""Multiple-choice data: C-Eval CSV, CMMLU CSV and MMLU-like JSONL, detected by content and checked
row by row (a malformed row is one error naming the file and the row).

- C-Eval CSV (SJTU-LIT/ceval `data/{dev,val,test}/{subject}_{split}.csv`): the header
  `id,question,A,B,C,D,answer[,explanation]`, the answer a letter A-D.
- CMMLU CSV (haonan-li/CMMLU `data/{dev,test}/{subject}.csv`): a first, unnamed index column, then
  `Question,A,B,C,D,Answer`.
- JSONL: one object a line, `{"question": str, "choices": [str, ...], "answer": int or letter}`
  (0-based index, or a letter A, B, ... of the choices), any number (2-26) of choices.

The subject of a CSV is its file name without the split suffix (`computer_network_val.csv` ->
`computer_network`), as Chinese-LLaMA-Alpaca's scripts/ceval/eval.py names it; a JSONL row may give
its own `"subject"`, else the file name's stem is used the same way.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import LlamaforgeError
from ...files.reading import read_text

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer"]
CMMLU_HEADER = ["Question", "A", "B", "C", "D", "Answer"]
FORMATS = ("ceval", "cmmlu", "jsonl")


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int          # 0-based index of the right choice
    subject: str
    row: int             # the row (CSV: data row after the header, 1-based; JSONL: line number)
    explanation: str = ""


def subject_of(path: str | os.PathLike) -> str:
    """The subject a file's name gives: its stem without a C-Eval/CMMLU split suffix."""
    return re.sub(r"_(dev|val|test)$", "", Path(path).stem) or Path(path).stem


def load_questions(path: str | os.PathLike, what: str = "multiple-choice data") -> tuple[str, list[Question]]:
    """(format, questions) of a C-Eval CSV, a CMMLU CSV or a JSONL file; one clear error otherwise."""
    text = read_text(path, what)
    fix_fmt = ("give a C-Eval CSV (id,question,A,B,C,D,answer), a CMMLU CSV (index,Question,A,B,C,D,Answer) "
               "or JSONL lines {\"question\", \"choices\", \"answer\"}")
    stripped = text.lstrip("\ufeff").lstrip()
    if not stripped:
        raise LlamaforgeError(f"the {what} is empty", path, fix_fmt)
    if stripped.startswith("{"):
        qs = _jsonl(path, text.lstrip("\ufeff"))
        fmt = "jsonl"
    else:
        fmt, qs = _csv(path, text.lstrip("\ufeff"), fix_fmt)
    if not qs:
        raise LlamaforgeError(f"the {what} has no question", path, "add at least one row")
    return fmt, qs


def _csv(path, text: str, fix_fmt: str) -> tuple[str, list[Question]]:
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header = [h.strip() for h in rows[0]]
    if header[:7] == CEVAL_HEADER and len(header) in (7, 8) and header[7:] in ([], ["explanation"]):
        fmt, first, answer_col = "ceval", 1, 6
    elif header[1:7] == CMMLU_HEADER and len(header) == 7:
        fmt, first, answer_col = "cmmlu", 1, 6
    elif header == CEVAL_HEADER[:6]:
        raise LlamaforgeError("a C-Eval test split: it has no answer column", path,
                              "score the val split (data/val/{subject}_val.csv), whose answers are published")
    else:
        raise LlamaforgeError(f"unknown CSV header {','.join(header)[:80]!r}", path, fix_fmt)
    subject = subject_of(path)
    out = []
    for n, row in enumerate(rows[1:], start=1):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"row {n} (line {_start_line(text, n)})"
        if len(row) != len(header):
            raise LlamaforgeError(f"{where} has {len(row)} fields, the header {len(header)}", path,
                                  "quote fields that hold commas or line breaks, as C-Eval's and CMMLU's CSVs do")
        question, choices, answer = row[first], [row[first + 1 + i] for i in range(4)], row[answer_col].strip()
        if not question.strip():
            raise LlamaforgeError(f"{where} has an empty question", path, "fill it in or remove the row")
        if answer not in ("A", "B", "C", "D"):  # one letter ("BC" is a substring of LETTERS, not an answer)
            raise LlamaforgeError(f"{where}: the answer {answer[:20]!r} is not one of A, B, C, D", path,
                                  "give the right choice's letter")
        out.append(Question(question, tuple(choices), LETTERS.index(answer), subject, n,
                            row[7] if fmt == "ceval" and len(row) == 8 else ""))
    return fmt, out


def _start_line(text: str, row: int) -> int:
    """The 1-based line a CSV data row starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    for i, _ in enumerate(reader):
        if i == row:
            return start
        start = reader.line_num + 1
    return start


def _jsonl(path, text: str) -> list[Question]:
    subject = subject_of(path)
    out = []
    # lines end at "\n" only: JSON strings may hold U+2028, U+0085 ... raw, which splitlines() also splits at
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise LlamaforgeError(f"{where} is not JSON ({e.msg})", path, "write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise LlamaforgeError(f"{where} is not a JSON object", path, "write one JSON object per line")
        q, choices, ans = obj.get("question"), obj.get("choices"), obj.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise LlamaforgeError(f"{where} has no \"question\" text", path, "give \"question\": \"...\"")
        if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise LlamaforgeError(f"{where}: \"choices\" is not a list of 2 to 26 non-empty strings", path,
                                  "give \"choices\": [\"...\", \"...\"]")
        if isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip() in LETTERS[:len(choices)]:
            ans = LETTERS.index(ans.strip())
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise LlamaforgeError(f"{where}: \"answer\" {str(ans)[:20]!r} is neither a 0-based index nor a letter "
                                  f"of its {len(choices)} choices", path, "give the right choice's index or letter")
        subj = obj.get("subject", subject)
        if not isinstance(subj, str):
            raise LlamaforgeError(f"{where}: \"subject\" is not a string", path, "give \"subject\": \"...\" or leave it out")
        out.append(Question(q, tuple(choices), ans, subj or subject, n))
    return out
