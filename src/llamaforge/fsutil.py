"""Atomic outputs and hashing.

A job writes into a hidden temporary sibling of its target and renames it into place only when
everything succeeded, so a killed or failed job never leaves an output that looks done, and
nothing the user made is ever overwritten by a half-written file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LlamaforgeError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_CACHE_MIN = 64 << 20  # only files this big are worth remembering


def sha256_file(path: str | os.PathLike) -> str:
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
    """sha256 of a file, remembered by (real path, size, mtime, inode) in ~/.cache/llamaforge.

    A 13 GB base is then hashed once, not at every merge that reads it. Set LLAMAFORGE_NO_HASH_CACHE=1
    to always hash. A file changed in place without a new mtime would be missed: tools that write
    weights always set one.
    """
    p = Path(path)
    st = p.stat()
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
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
    if use and st.st_size >= _CACHE_MIN:
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
    return digest


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
    """Remove temporary siblings of `target` left by a killed writer on this host (SIGKILL, OOM)."""
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


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` on success.

    On any exception the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are ordinary folders
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            _clear(old)
            os.replace(target, old)
            os.replace(tmp, target)
            _clear(old)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `target` for writing; rename it into place on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    fd, tmpname = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    tmp = Path(tmpname)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def require_file(path: str | os.PathLike, what: str, fix: str | None = None) -> Path:
    """Return `path` as a Path if it is a readable file, else raise a clear error."""
    p = Path(path)
    if not p.exists():
        raise LlamaforgeError(f"{what} not found", p, fix or "check the path in config.yaml or on the command line")
    if not p.is_file():
        raise LlamaforgeError(f"{what} is not a file", p, fix or "point to the file itself, not a folder")
    return p


def require_dir(path: str | os.PathLike, what: str, fix: str | None = None) -> Path:
    p = Path(path)
    if not p.exists():
        raise LlamaforgeError(f"{what} not found", p, fix or "check the path in config.yaml or on the command line")
    if not p.is_dir():
        raise LlamaforgeError(f"{what} is not a folder", p, fix or "point to the folder that holds the files")
    return p


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented UTF-8 JSON with sorted keys (stable bytes for stable inputs), atomically."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """A UTF-8 text file, with clear errors for a missing or undecodable file."""
    p = require_file(path, what)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlamaforgeError(f"{what} is not UTF-8 text (byte {e.start})", p, "save it as UTF-8") from None


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    p = Path(path)
    try:
        return json.loads(read_text(p, what))
    except json.JSONDecodeError as e:
        raise LlamaforgeError(f"{what} is not valid JSON ({e.msg}, line {e.lineno})", p,
                              "repair it or build it again") from None


def hash_files(folder: Path, known: dict[str, str]) -> dict[str, str]:
    """`known` completed with the sha256 of every other file directly in `folder`, sorted by name."""
    out = dict(known)
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in out:
            out[f.name] = sha256_file(f)
    return dict(sorted(out.items()))
