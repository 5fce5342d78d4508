"""The one exception type for user-facing errors.

Every message names the file at fault and the fix, on one line, so that a Snakemake log or a
terminal shows the user what to do without a traceback.
"""

from __future__ import annotations

import os
import unicodedata


def printable_path(path: str | os.PathLike) -> str:
    """A path as one line shows it: control characters and line separators (a file named
    "a\\nb", "a\\rb") as their escapes, so a hostile name can neither break the error line in two
    nor hide part of it."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") else c
                   for c in os.fsdecode(path))


class LlamaforgeError(Exception):
    """An error caused by the user's input, with the file and the fix in the message."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, fix: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{printable_path(path)}:")
        parts.append(message.rstrip("."))
        text = " ".join(parts) + "."
        if fix:
            text += f" Fix: {fix.rstrip('.')}."
        super().__init__(" ".join(text.splitlines()))
        self.path = None if path is None else os.fspath(path)
        self.fix = fix
