"""Hashing (sha256 of files, remembered across runs by file identity) and the metadata cache: each
metadata file of a model, adapter or tokenizer folder is opened once per process (`metadata_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

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


def hash_files(folder: Path, known: dict[str, str]) -> dict[str, str]:
    """`known` completed with the sha256 of every other file directly in `folder`, sorted by name."""
    out = dict(known)
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in out:
            out[f.name] = sha256_file(f)
    return dict(sorted(out.items()))
