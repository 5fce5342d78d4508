"""Output safety: nothing a user has is ever destroyed. `guard_output` lets a job replace only what
llamaforge itself wrote (each output kind's ownership test, `owned_by`), never an input or a
user's file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import LlamaforgeError

_OWN_MANIFEST = "llamaforge.json"


def _json_of(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest_kind(folder: Path, name: str = _OWN_MANIFEST):
    data = _json_of(folder / name)
    return data.get("llamaforge") if isinstance(data, dict) else None


SUMS_MARK = "# llamaforge export_pth"


def sums_header(kind: str) -> str:
    """The comment line llamaforge puts first in the SHA256SUMS it writes (`sha256sum -c` skips
    lines starting with '#'), by which a later run recognises the folder as its own output."""
    return f"# llamaforge {kind}\n"


def _sums_kind(folder: Path) -> str | None:
    """'export_pth' when the folder's SHA256SUMS is the one a Meta export writes: the header line
    `# llamaforge export_pth` (or none: earlier llamaforge versions), then only '<sha256>  <name>'
    lines that list exactly the folder's other files (params.json, tokenizer.model and the
    consolidated.NN.pth files). A header alone is no mark: a folder holding anything else is not ours."""
    try:
        lines = (folder / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
        present = {p.name for p in folder.iterdir()} - {"SHA256SUMS"}
    except (OSError, UnicodeDecodeError):
        return None
    if lines and lines[0] == SUMS_MARK:
        lines = lines[1:]
    if not lines or not all(_SUM_LINE.fullmatch(line) for line in lines):
        return None
    listed = {line[66:] for line in lines}
    ok = listed == present and {"params.json", "consolidated.00.pth"} <= listed and all(
        n in ("params.json", "tokenizer.model") or re.fullmatch(r"consolidated\.\d\d\.pth", n) for n in listed)
    return "export_pth" if ok else None


_SUM_LINE = re.compile(r"[0-9a-f]{64} [ *]\S.*")


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
    return (len(lines) == 1 and bool(_SUM_LINE.fullmatch(lines[0]))
            and lines[0][66:] == path.name[:-len(".sha256")])


def _gguf_is_own(path: Path) -> bool:
    try:
        import gguf

        field = gguf.GGUFReader(path, "r").fields.get(GGUF_OWN_KEY)
        return field is not None and field.types == [gguf.GGUFValueType.STRING]
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _legacy_tokenizer_report(folder: Path) -> bool:
    """merge_report.json of a tokenizer merge by an earlier llamaforge (no "llamaforge" key)."""
    data = _json_of(folder / "merge_report.json")
    return isinstance(data, dict) and {"base_pieces", "extra_pieces", "merged_pieces", "added_pieces"} <= data.keys()


def _png_is_own(path: Path) -> bool:
    """A PNG whose `Software` text chunk names llamaforge (set by its plots)."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return False
    return data.startswith(b"\x89PNG\r\n\x1a\n") and b"Software\x00llamaforge" in data


def json_of_kind(kind: str):
    """The ownership test of a JSON object llamaforge writes with "llamaforge": `kind` (a result,
    settings, stats), for guard_output's `own`: the writer names the kind it writes, so no other
    JSON (a user's with a "llamaforge" key, another kind of result) is taken for its output."""
    def test(path: Path) -> bool:
        data = _json_of(path)
        return isinstance(data, dict) and data.get("llamaforge") == kind
    return test


def _records_are(path: Path, keys: set[str]) -> bool:
    """A JSON list of records with exactly the fields `keys` (llamaforge's predictions)."""
    data = _json_of(path)
    return isinstance(data, list) and all(isinstance(x, dict) and set(x) == keys for x in data)


def _first_record(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


GGUF_OWN_KEY = "llamaforge.version"


# How llamaforge recognises its own earlier output of each kind (what it wrote into it).
_OWN: dict[str, tuple[str, object]] = {
    "merge": ("merged model folder", lambda p: p.is_dir() and _manifest_kind(p) == "merge"),
    "import": ("imported model folder", lambda p: p.is_dir() and _manifest_kind(p) == "import_pth"),
    "tokenizer": ("merged tokenizer folder", lambda p: p.is_dir() and (
        _manifest_kind(p, "merge_report.json") == "merge_tokenizers" or _legacy_tokenizer_report(p))),
    "pth": ("Meta export folder", lambda p: p.is_dir() and _sums_kind(p) == "export_pth"),
    "demo": ("demo folder", lambda p: p.is_dir() and _manifest_kind(p) == "demo"),
    "gguf": ("GGUF file", lambda p: p.is_file() and _gguf_is_own(p)),
    "sha256": ("checksum file", lambda p: p.is_file() and _is_sidecar(p)),
    # a JSON result: its writer passes the test of its kind (guard_output's own=json_of_kind(KIND))
    "json": ("llamaforge JSON file", lambda p: False),
    "crawl_stats": ("crawl stats file", lambda p: p.is_file() and isinstance(d := _json_of(p), dict) and (
        d.get("llamaforge") == "crawl" or {"requests", "items", "tokens", "cost_usd"} <= d.keys())),
    # the crawl's Alpaca JSON: judged by crawl/store.py against its items file (guard_output's `own`)
    "alpaca": ("Alpaca JSON of this crawl's items", lambda p: False),
    "predictions": ("predictions file",
                    lambda p: p.is_file() and _records_are(p, {"instruction", "input", "prompt", "output"})),
    # the crawl's append-only files: judged by their first line (a later one may be torn by a kill)
    "crawl_raw": ("crawl reply file", lambda p: p.is_file() and isinstance(r := _first_record(p), dict)
                  and {"index", "seed", "items_per_request", "content"} <= r.keys()),
    # "crawl_items": registered by crawl/store.py (the items file is the crawl's when its reply file is)
    "png": ("llamaforge plot", lambda p: p.is_file() and _png_is_own(p)),
}


def owned_by(kind: str, what: str):
    """Decorator: register `test(path) -> bool`, by which guard_output recognises llamaforge's own
    earlier output of `kind` (`what` names it in the error). A writer defines the mark of its
    output beside itself (export/modelfile.py's Modelfile, files/checksums.py's report), as a whole-file check of
    what only it writes: a first line a user may type is no mark."""
    def register(test):
        _OWN[kind] = (what, lambda p: p.is_file() and test(p))
        return test
    return register


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
    what, registered = _OWN[kind]
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
