"""What several evaluations share: the "llamaforge" value of each result file, the default
equivalence tolerance, the output guard, the evaluation text and the logger."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import defaults as D
from ..errors import LlamaforgeError
from ..files.guard import guard_output, json_of_kind
from ..files.reading import read_text

# one logger for the whole package, under the name the single module had (it shows in the log lines)
log = logging.getLogger("llamaforge.evaluate")

# the "llamaforge" value of each result file written here (by which a later run knows it as its own)
PERPLEXITY, EQUIVALENCE, TOKENIZER_STATS, SUMMARY, GGUF_QUALITY = (
    "perplexity", "equivalence", "tokenizer_stats", "summary", "gguf_quality")

DEFAULT_TOLERANCE = D.EQUIVALENCE_TOLERANCE


def _guard(output, kind: str, inputs) -> None:
    """An evaluation output must not overwrite an input, nor a file that is not llamaforge's result of
    the same kind (its "llamaforge" value)."""
    if output:
        guard_output(output, "json", inputs, own=json_of_kind(kind))


def _eval_text(path: str | os.PathLike | None, what: str) -> tuple[str, str]:
    """(text, name for the result) of a UTF-8 text file; None: the bundled Chinese + English sample."""
    if path is None:
        from ..tokenizer import bundled_text

        return bundled_text("eval_text.txt"), "llamaforge/data/eval_text.txt"
    text = read_text(path, what)
    if not text.strip():
        raise LlamaforgeError(f"the {what} is empty", Path(path), "give a file with some text")
    return text, os.fspath(path)
