"""Output safety: nothing a user has is ever destroyed. `guard_output` lets a job replace only what
llamaforge itself wrote (each output kind's ownership test, registered by the module that writes
that output: `register_output_kind`, `owned_by`), never an input or a user's file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import LlamaforgeError


def json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sums_header(kind: str) -> str:
    """The comment line llamaforge puts first in the SHA256SUMS it writes (`sha256sum -c` skips
    lines starting with '#'), by which a later run recognises the folder as its own output."""
    return f"# llamaforge {kind}\n"


def json_of_kind(kind: str):
    """The ownership test of a JSON object llamaforge writes with "llamaforge": `kind` (a result,
    settings, stats, a folder's manifest), for guard_output's `own`: the writer names the kind it
    writes, so no other JSON (a user's with a "llamaforge" key, another kind of result) is taken for
    its output."""
    def test(path: Path) -> bool:
        data = json_or_none(path)
        return isinstance(data, dict) and data.get("llamaforge") == kind
    return test


# How llamaforge recognises its own earlier output of each kind (what it wrote into it): kind ->
# (what it is, test). Each writer registers the mark of its output beside itself
# (register_output_kind / owned_by), so this module knows no format.
_OWN: dict[str, tuple[str, Callable[[Path], bool]]] = {}


def register_output_kind(kind: str, what: str, test: Callable[[Path], bool], folder: bool = False) -> None:
    """Register `test(path) -> bool`, by which guard_output recognises llamaforge's own earlier
    output of `kind`: a folder (`folder=True`) or a regular file; `what` names it in the error. The
    test is a whole-file (whole-folder) check of what only its writer writes: a first line a user may
    type is no mark."""
    is_kind = Path.is_dir if folder else Path.is_file
    _OWN[kind] = (what, lambda p: is_kind(p) and test(p))


def owned_by(kind: str, what: str, folder: bool = False):
    """Decorator form of register_output_kind: the decorated test is registered for `kind`."""
    def register(test):
        register_output_kind(kind, what, test, folder)
        return test
    return register


# a JSON result: its writer passes the test of its kind (guard_output's own=json_of_kind(KIND))
register_output_kind("json", "llamaforge JSON file", lambda p: False)


def _registered(kind: str) -> tuple[str, Callable[[Path], bool]]:
    try:
        return _OWN[kind]
    except KeyError:
        raise RuntimeError(f"no ownership mark is registered for the output kind {kind!r}: the module that "
                           "writes it registers it (register_output_kind), and must be imported before "
                           "guard_output is called for it") from None


def _is_empty(p: Path) -> bool:
    """An empty file, or a folder with no file at any depth (Snakemake makes the folders of a
    job's outputs before the job runs): replacing it loses nothing."""
    try:
        if p.is_dir() and not p.is_symlink():
            return all(c.is_dir() and not c.is_symlink() and _is_empty(c) for c in p.iterdir())
        return p.is_file() and not p.is_symlink() and p.stat().st_size == 0
    except OSError:
        return False


def resolve_path(path: Path, what: str) -> Path:
    """path.resolve(), with a symlink loop (or a link too deep to follow) as one clear error."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError: "Symlink loop" before Python 3.13; ELOOP after
        raise LlamaforgeError(f"{what} is a symbolic link that cannot be followed ({e})", path,
                              "remove the broken link or give another path") from None


def _overlap(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "holds"
    if out.is_relative_to(inp):
        return "lies inside"
    return None


def guard_output(output: str | os.PathLike, kind: str,
                 inputs: "list[tuple[str, str | os.PathLike | None]]" = (), own=None) -> Path:
    """Refuse, before anything is read or written, an output that would destroy what a user has.

    * An output that is, holds or lies inside any input (symlinks resolved) is refused.
    * An existing output is replaced only when it is llamaforge's own earlier output of the same
      `kind`, recognised by what llamaforge wrote into it (a manifest, the SHA256SUMS header, the
      GGUF key `llamaforge.version`, ...); an empty file or folder may go too. Anything else is
      refused with one line naming it.

    `inputs`: (description, path) pairs; a None path is skipped. `own`: the test of ownership when
    it needs what only the caller knows (the crawl's Alpaca JSON is its own when it is the Alpaca
    form of its items file), instead of the one registered for `kind`. Returns `output` as a Path.
    """
    out = Path(output)
    what, registered = _registered(kind)
    own = registered if own is None else (lambda p, test=own: p.is_file() and test(p))
    resolved = resolve_path(out, "the output")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LlamaforgeError(f"the output's folder {parent} is a file", out,
                                      "choose an output path in a folder")
            break
    for desc, p in inputs:
        if p is None:
            continue
        rel = _overlap(resolved, resolve_path(Path(p), f"the {desc}"))
        if rel is not None:
            raise LlamaforgeError(
                f"the output {rel} the {desc} {os.fspath(p)}; writing it would destroy that input", out,
                "choose an output path outside every input (e.g. merged/NAME, exports/NAME)")
    if out.is_symlink() or out.exists():
        target = resolved if out.is_symlink() else out
        if not (_is_empty(target) or own(target)):
            kind_of = "folder" if target.is_dir() else "file"
            raise LlamaforgeError(
                f"the output exists and is not {'an' if what[0] in 'aeiouAEIOU' else 'a'} {what} that llamaforge wrote (an existing {kind_of} is only "
                "replaced when it is llamaforge's own earlier output of the same kind)", out,
                "choose another output path, or move that one away yourself if it may go")
    return out
