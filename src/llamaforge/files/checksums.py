"""Checksums of every output: SHA256SUMS in a folder, `<file>.sha256` beside a file (both
`sha256sum -c` compatible, from inside the folder), and the check of expected hashes
(`verify/{model}`, config.yaml's sha256:). The hashes themselves are computed while the files are
written (`stream.HashingWriter`), never by reading an output again."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

from ..errors import LlamaforgeError
from .atomic import atomic_file
from .guard import guard_output, owned_by
from .hashing import sha256_file
from .reading import read_text, small_text_lines

SUMS = "SHA256SUMS"
REPORT_HEADER = "# llamaforge verify"
_REPORT_LINE = re.compile(r"(OK {7}|FAILED {3}|MISSING {2})\S.*")
SUM_LINE = re.compile(r"[0-9a-f]{64} [ *]\S.*")  # a line of sums_text: '<sha256>  <name>'


@owned_by("verify_report", "checksum report")
def is_own_report(path: Path) -> bool:
    """A report as verify_to_report writes it, whole: the header line, then only OK/FAILED/MISSING
    lines (a text that merely starts with "# llamaforge" is not one)."""
    lines = small_text_lines(path, 16 << 20)
    return (lines is not None and len(lines) > 2 and lines[0] == REPORT_HEADER and lines[-1] == ""
            and all(_REPORT_LINE.fullmatch(line) for line in lines[1:-1]))


@owned_by("sha256", "checksum file")
def _is_sidecar(path: Path) -> bool:
    """A `<file>.sha256` as llamaforge writes it: one '<sha256>  <file>' line naming the file it is
    beside (a SHA256SUMS, or the hash of another file, is not that)."""
    if not path.name.endswith(".sha256"):
        return False
    try:
        if path.stat().st_size > 4096:
            return False
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return (len(lines) == 1 and bool(SUM_LINE.fullmatch(lines[0]))
            and lines[0][66:] == path.name[:-len(".sha256")])


def sums_text(hashes: dict[str, str], header: str = "") -> str:
    """`sha256sum` format: '<hash>  <name>' per line, sorted by name, after an optional '#' line."""
    return header + "".join(f"{h}  {name}\n" for name, h in sorted(hashes.items()))


def parse_sums(path: str | os.PathLike) -> dict[str, str]:
    """Read a SHA256SUMS / .sha256 file (as sha256sum writes it: text or '*' binary mode)."""
    path = Path(path)
    out = {}
    for n, line in enumerate(read_text(path, "checksum file").splitlines(), 1):
        if not line.strip() or line.startswith("#"):  # sha256sum -c skips comment lines too
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise LlamaforgeError(f"line {n} is not '<sha256>  <file>'", path, "regenerate it with the export")
        out[parts[1].lstrip("*").strip()] = parts[0].lower()
    return out



def verify_sha256(expected: dict[str, str], sums_files: Iterable[str | os.PathLike] = (),
                  root: str | os.PathLike = ".", echo: Callable[[str], None] = print) -> list[str]:
    """Check files against expected hashes (paths relative to `root`, as in config.yaml's sha256:)
    and against SHA256SUMS / .sha256 files (names relative to each file's folder).

    Returns the report lines; raises LlamaforgeError naming the first mismatching file.
    """
    root = Path(root)
    checks: list[tuple[Path, str, str]] = []  # (file, expected hash, where the expectation comes from)
    for rel, h in expected.items():
        checks.append((root / rel, h.lower(), "config.yaml (sha256:)"))
    for sums in map(Path, sums_files):
        if not sums.is_file():
            raise LlamaforgeError("checksum file not found", sums, "build the export again")
        for name, h in parse_sums(sums).items():
            checks.append((sums.parent / name, h, os.fspath(sums)))
    lines, bad = [], []
    digests: dict[Path, str] = {}  # a file listed twice (config.yaml and SHA256SUMS) is hashed once
    for path, want, where in checks:
        if not path.is_file():
            bad.append(LlamaforgeError(f"file listed in {where} does not exist", path,
                                       "build it (snakemake <target>) or fix the path in config.yaml"))
            lines.append(f"MISSING  {path}")
            echo(lines[-1])
            continue
        key = path.resolve()
        if key not in digests:
            digests[key] = sha256_file(path)
        got = digests[key]
        if got != want:
            bad.append(LlamaforgeError(f"sha256 is {got} but {where} expects {want}", path,
                                       "the file differs from the published one: rebuild it from the right inputs, "
                                       "or correct the expected hash"))
            lines.append(f"FAILED   {path}  {got} != {want}")
        else:
            lines.append(f"OK       {path}  {got}")
        echo(lines[-1])
    if bad:
        if len(bad) > 1:
            raise LlamaforgeError(f"{bad[0]} ({len(bad) - 1} more file(s) failed)")
        raise bad[0]
    if not checks:
        raise LlamaforgeError("nothing to verify: no expected hash given and the checksum files list no file",
                              next(iter(map(Path, sums_files)), None),
                              "list published hashes under the model's sha256: in config.yaml, or give a SHA256SUMS "
                              "that names files")
    return lines


def verify_to_report(expected: dict[str, str], sums_files: Iterable[str | os.PathLike], output: str | os.PathLike,
                     echo: Callable[[str], None] = print) -> list[str]:
    """verify_sha256, then its report at `output` (marked as llamaforge's own, so a later run may
    replace it). The output is checked before any file is hashed."""
    sums_files = list(sums_files)
    guard_output(output, "verify_report", [("checked file", p) for p in [*expected, *sums_files]])
    lines = verify_sha256(expected, sums_files, echo=echo)
    with atomic_file(output, "w") as f:
        f.write(REPORT_HEADER + "\n" + "".join(line + "\n" for line in lines))
    return lines
