"""Atomic outputs: a job writes into a hidden temporary sibling of its target and renames it into
place only when everything succeeded, so a killed or failed job never leaves an output that looks
done, and nothing the user made is ever overwritten by a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import LlamaforgeError

log = logging.getLogger(__name__)


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
