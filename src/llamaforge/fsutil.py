"""Atomic outputs and hashing.

A job writes into a hidden temporary sibling of its target and renames it into place only when
everything succeeded, so a killed or failed job never leaves an output that looks done, and
nothing the user made is ever overwritten by a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LlamaforgeError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_CACHE_MIN = 64 << 20  # only files this big are worth remembering


# The metadata files of model, adapter and tokenizer folders. Several modules look at each
# (the family, the tokenizer checks, the GGUF keys, the hashes in a manifest, a copy into the
# output); each is opened once per process and served from memory after that (`metadata_bytes`).
METADATA_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "adapter_config.json", "params.json",
})
_METADATA_MAX = 64 << 20  # a larger "metadata" file is read as any other file, never held
_metadata: dict[tuple, bytes] = {}


def is_metadata(path: str | os.PathLike) -> bool:
    return os.path.basename(os.fspath(path)) in METADATA_FILES


def metadata_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a metadata file (METADATA_FILES), read once per process: later calls are served
    from memory while the file is the same one (device, inode, size, mtime and ctime unchanged), so
    a file replaced or rewritten between two calls is read again."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    data = _metadata.get(key)
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) <= _METADATA_MAX and stat.S_ISREG(st.st_mode):
            if len(_metadata) >= 256:
                _metadata.clear()
            _metadata[key] = data
    return data


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """shutil.copyfile, but a metadata file is written from the bytes already read (metadata_bytes)."""
    if is_metadata(src):
        with open(dst, "wb") as f:
            f.write(metadata_bytes(src))
    else:
        shutil.copyfile(src, dst)


def sha256_file(path: str | os.PathLike) -> str:
    if is_metadata(path):
        return hashlib.sha256(metadata_bytes(path)).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llamaforge" / "sha256.json"


def sha256_cached(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered by (real path, size, mtime, ctime, inode) in ~/.cache/llamaforge.

    A 13 GB base is then hashed once, not at every merge that reads it. Set LLAMAFORGE_NO_HASH_CACHE=1
    to always hash. The ctime is part of the key because a write cannot preserve it: a file
    rewritten in place with its old mtime put back (`touch -d`, `cp -p`, rsync) is hashed again.
    """
    p = Path(path)
    st = p.stat()
    key = _hash_key(p, st)
    use = not os.environ.get("LLAMAFORGE_NO_HASH_CACHE")
    cache_path = _cache_file()
    cache = {}
    if use:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return cache[key]
    digest = sha256_file(p)
    if use:
        _remember(st, key, digest, cache)
    return digest


def _hash_key(p: Path, st: os.stat_result) -> str:
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Put the sha256 of a file llamaforge has just written (hashed as it was written) into
    sha256_cached's cache, so a later reader (--from-f16 of a 13 GB F16) need not read it all again."""
    if os.environ.get("LLAMAFORGE_NO_HASH_CACHE"):
        return
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return
    _remember(st, _hash_key(p, st), digest, {})


def _remember(st: os.stat_result, key: str, digest: str, cache: dict) -> None:
    cache_path = _cache_file()
    if st.st_size >= _CACHE_MIN:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            try:  # merge with what other processes wrote meanwhile
                cache.update(json.loads(cache_path.read_text()))
            except (OSError, ValueError):
                pass
            cache[key] = digest
            fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=".sha256-")
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only home: no cache, same result


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


_HOST = socket.gethostname().replace("-", "_")


def _tmp_prefix(target: Path) -> str:
    # host and pid in the name, so a later run can tell a dead writer's leftovers from a live one's
    return f".{target.name}.tmp-{_HOST}-{os.getpid()}-"


def _remove_stale(target: Path) -> None:
    """Remove temporary siblings of `target` left by a killed writer on this host (SIGKILL, OOM):
    half-written outputs and the previous output a replacement had moved aside."""
    for p in target.parent.glob(f".{glob.escape(target.name)}.tmp-{glob.escape(_HOST)}-*"):
        try:
            pid = int(p.name[len(f".{target.name}.tmp-{_HOST}-"):].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        log.info("removing %s, left by a writer that was killed", p)
        _clear(p)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space(folder: Path, need: int) -> LlamaforgeError:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    what = f"{need} bytes needed" if need else "more space needed"
    if free is not None:
        what += f", {free} free"
    return LlamaforgeError(f"no space left on the device ({what})", folder,
                           "free space there, or write the output to another disk")


def _check_space(folder: Path, need: int) -> None:
    """Refuse to start an output of `need` bytes in `folder` when the disk cannot hold it."""
    if need <= 0:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise _no_space(folder, need)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, need_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` on success.

    On any exception the temporary folder is removed and `target` is left as it was. A previous
    `target` is moved aside under a temporary name (which a later run removes if this one is
    killed before it could) and deleted once the new one is in place. `need_bytes`: the output's
    size, checked against the free space first; running out of space midway is one clear error.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    _check_space(target.parent, need_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are ordinary folders
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            old = target.parent / (_tmp_prefix(target) + "old")
            _clear(old)
            os.replace(target, old)
            os.replace(tmp, target)
            _clear(old)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise _no_space(target.parent, need_bytes) from None
        raise


@contextlib.contextmanager
def atomic_files(targets: list[str | os.PathLike], need_bytes: int = 0) -> Iterator[list[Path]]:
    """Temporary files beside `targets` (written by the caller); renamed into place together.

    The previous targets are removed first and the new ones renamed in order, so a process killed
    midway leaves the last target missing (a build tool then reruns the job), never a new first
    file beside an old last one (a GGUF beside the .sha256 of its predecessor).
    """
    targets = [Path(t) for t in targets]
    tmps: list[Path] = []
    try:
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(t)
        _check_space(targets[0].parent, need_bytes)
        for t in targets:
            fd, name = tempfile.mkstemp(prefix=_tmp_prefix(t), dir=t.parent)
            os.close(fd)
            tmps.append(Path(name))
            os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for t in reversed(targets):
            if t.is_symlink() or t.exists():
                _clear(t)
        for tmp, t in zip(tmps, targets):
            os.replace(tmp, t)
        _fsync_dir(targets[0].parent)
    except BaseException as e:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise _no_space(targets[0].parent, need_bytes) from None
        raise


@contextlib.contextmanager
def scratch_file(beside: str | os.PathLike, name: str) -> Iterator[Path]:
    """A temporary file `.{name}.tmp-HOST-PID-*` in `beside`'s folder for an intermediate (the F16
    GGUF a quantized export is made from), removed afterwards; one left by a killed run is removed
    by the next, as atomic_files' temporaries are."""
    target = Path(beside).parent / name
    _remove_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "wb", need_bytes: int = 0) -> Iterator:
    """Open a temporary file beside `target` for writing; rename it into place on success."""
    with atomic_files([target], need_bytes) as (tmp,):
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()


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


def finite_json(obj):
    """`obj` with every non-finite float (NaN, infinity) as None: JSON has no such numbers, and the
    bare NaN that Python writes by default is refused by strict parsers (jq, JSON.parse)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented UTF-8 JSON with sorted keys (stable bytes for stable inputs), atomically;
    a non-finite number is written as null (finite_json)."""
    with atomic_file(path, "w") as f:
        json.dump(finite_json(obj), f, ensure_ascii=False, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


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


def hash_files(folder: Path, known: dict[str, str]) -> dict[str, str]:
    """`known` completed with the sha256 of every other file directly in `folder`, sorted by name."""
    out = dict(known)
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in out:
            out[f.name] = sha256_file(f)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# output safety: nothing a user has is ever destroyed

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
    output beside itself (quantize.py's Modelfile, checksums.py's report), as a whole-file check of
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
