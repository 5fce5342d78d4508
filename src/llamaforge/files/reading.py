"""Reading inputs with one-line errors: files and folders that must exist, UTF-8 text, JSON objects.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import LlamaforgeError
from .hashing import is_metadata, metadata_bytes


def _require(path: str | os.PathLike, what: str, fix: str | None, is_kind, kind: str, kind_fix: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise LlamaforgeError(f"{what} not found", p, fix or "check the path in config.yaml or on the command line")
    if not is_kind(p):
        raise LlamaforgeError(f"{what} is not a {kind}", p, fix or kind_fix)
    return p


def require_file(path: str | os.PathLike, what: str, fix: str | None = None) -> Path:
    """Return `path` as a Path if it is a readable file, else raise a clear error."""
    return _require(path, what, fix, Path.is_file, "file", "point to the file itself, not a folder")


def require_regular_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """`path` as a Path if it is a regular file (followed through links); a missing path, a folder,
    a device (/dev/zero), a FIFO or a socket is each one error that says which."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise LlamaforgeError(f"{what} does not exist", p, fix) from None
    except (OSError, RuntimeError) as e:
        raise LlamaforgeError(f"{what} cannot be opened ({getattr(e, 'strerror', None) or e})", p, fix) from None
    if stat.S_ISDIR(st.st_mode):
        raise LlamaforgeError(f"{what} is a folder, not a file", p, fix)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket")
        raise LlamaforgeError(f"{what} is {kind}, not a regular file", p, fix)
    return p


def in_folder(folder: Path, name: str, where: str, fix: str) -> Path:
    """folder/name, which must be a file: else "no NAME in the WHERE" with `fix`."""
    path = folder / name
    if not path.is_file():
        raise LlamaforgeError(f"no {name} in the {where}", folder, fix)
    return path


def require_dir(path: str | os.PathLike, what: str, fix: str | None = None) -> Path:
    return _require(path, what, fix, Path.is_dir, "folder", "point to the folder that holds the files")


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """A UTF-8 text file, with clear errors for a missing or undecodable file."""
    p = require_file(path, what)
    try:
        if is_metadata(p):
            return metadata_bytes(p).decode("utf-8")
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlamaforgeError(f"{what} is not UTF-8 text (byte {e.start})", p, "save it as UTF-8") from None


def small_text_lines(path: Path, limit: int) -> list[str] | None:
    """The lines of a UTF-8 text file of at most `limit` bytes (split on "\n", so a final newline
    gives a last empty line), or None for a larger, unreadable or non-UTF-8 file: what an ownership
    test reads before it judges a file as llamaforge's own."""
    try:
        if path.stat().st_size > limit:
            return None
        return path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return None


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    p = Path(path)
    try:
        return json.loads(read_text(p, what))
    except json.JSONDecodeError as e:
        raise LlamaforgeError(f"{what} is not valid JSON ({e.msg}, line {e.lineno})", p,
                              "repair it or build it again") from None
    except RecursionError:
        raise LlamaforgeError(f"{what} is not valid JSON (nested too deeply)", p, "repair it or build it again") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """read_json of a file that must hold a JSON object: a list, a number, a string or null is one error."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise LlamaforgeError(f"{what} holds a JSON {kind}, not an object", Path(path), "repair it or build it again")
    return data
