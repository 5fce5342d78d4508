"""The one exception type for user-facing errors.

Every message names the file at fault and the fix, on one line, so that a Snakemake log or a
terminal shows the user what to do without a traceback.
"""

from __future__ import annotations

import os


class LlamaforgeError(Exception):
    """An error caused by the user's input, with the file and the fix in the message."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, fix: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{os.fspath(path)}:")
        parts.append(message.rstrip("."))
        text = " ".join(parts) + "."
        if fix:
            text += f" Fix: {fix.rstrip('.')}."
        super().__init__(" ".join(text.split("\n")))
        self.path = None if path is None else os.fspath(path)
        self.fix = fix
