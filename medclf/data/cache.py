"""The decoded-store cache on disk: its key, its temporary folders, and its maintenance (list, clear, prune).

What the key covers
-------------------
A cached store is reused only when all of these match what it was built from: the cache format
version; the stored size, channel count and data kind; for image files, the DICOM mapping's name
(`dicom.MAPPING`, changed whenever the rules that turn a DICOM into 8-bit pixels change), every file's path (in
split order), byte size and modification time (nanoseconds), plus a hash of the files' contents
when the split's files total at most 64 MB; for an .npz file, its resolved path, byte size,
modification time, the split's array name and row indices, plus a hash of the file's contents
when it is at most 64 MB. The cache holds pixels, the list of files skipped as unreadable and, for
image files, each file's SHA-256 (taken while decoding, for the exact-duplicate check), and nothing
else: class names, labels and ids are read from the data on every open, so a model with
another class list never sees stale labels. A store that skipped unreadable files is used only
with --skip-bad, as a fresh decode would be. Not detected: a file above those sizes whose bytes
change while its size and modification time stay the same (e.g. restored with `cp -p`); use
--no-cache or `medclf cache clear` after such a restore.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dicom
from .sources import Source, Split

CACHE_VERSION = 2
CONTENT_HASH_MAX_BYTES = 64 << 20  # hashing this much costs well under the decode it guards
STALE_TMP_SECONDS = 2 * 24 * 3600  # no decode runs this long: an older temporary store is an orphan
TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"^\.tmp-(\d+)@(.*)\.[^.]+$")
_OLD_TMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}")  # tempfile.mkdtemp(prefix=".tmp-") names of earlier medclf versions


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    from .named import data_home

    return data_home() / "stores"


def cache_key(split: Split, source: Source, size: int, channels: int) -> str:
    """The folder name of a split's store; see the module docstring for exactly what it covers."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{size}|{channels}|{source.kind}".encode())
    if split.paths is not None:
        h.update(f"|{dicom.MAPPING}\n".encode())
        files = split.paths
        stats = [os.stat(p) for p in files]
        for p, st in zip(files, stats):
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    else:
        files = [str(source.root)]
        stats = [os.stat(source.root)]
        h.update(f"{Path(source.root).resolve()}|{stats[0].st_size}|{stats[0].st_mtime_ns}|{split.npz_key}".encode())
        h.update(np.ascontiguousarray(split.rows).tobytes())
    if sum(st.st_size for st in stats) <= CONTENT_HASH_MAX_BYTES:
        for p in files:
            with open(p, "rb") as f:
                h.update(hashlib.file_digest(f, "sha1").digest())
    return h.hexdigest()[:20]


def new_tmp_dir(root: Path) -> Path:
    """A fresh temporary store folder in root, named after this process so others can tell when it is orphaned."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{os.getpid()}@{socket.gethostname()}."))


def reserved_npy(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A writable uint8 .npy memory map whose disk space is allocated up front.

    A sparse map on a full disk dies with SIGBUS on the first write to an unbacked page; reserving
    the blocks first turns a full disk into an OSError here, which the caller can answer.
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        total = offset + int(np.prod(shape))
        if not _fallocate(f.fileno(), total):  # writing the zeros reserves the blocks as well
            for start in range(offset, total, 1 << 20):
                f.write(bytes(min(1 << 20, total - start)))
    return np.memmap(path, np.uint8, "r+", offset=offset, shape=shape)


def _fallocate(fd: int, total: int) -> bool:
    """Reserve total bytes; False where this system or filesystem cannot (macOS, some network filesystems)."""
    if not hasattr(os, "posix_fallocate"):
        return False
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise  # ENOSPC and the like: the caller falls back to memory
    return True


def is_stale_tmp(folder: Path, now: float | None = None) -> bool:
    """A temporary store whose writer is gone (same host, pid not running) or older than any decode could be."""
    try:
        newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()])
    except OSError:  # vanished meanwhile: its writer finished or another process cleaned it
        return False
    if (now or time.time()) - newest > STALE_TMP_SECONDS:
        return True
    match = _TMP_NAME.match(folder.name)
    if not match or match.group(2) != socket.gethostname():
        return False
    return not _pid_running(int(match.group(1)))


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_tmps(root: Path) -> int:
    """Delete orphaned temporary stores under root (left by killed runs); returns the bytes freed."""
    freed = 0
    for folder in _tmp_dirs(root):
        if is_stale_tmp(folder):
            freed += _folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
    return freed


def _tmp_dirs(root: Path) -> list[Path]:
    try:
        return [p for p in root.iterdir() if p.is_dir() and (_TMP_NAME.match(p.name) or _OLD_TMP_NAME.fullmatch(p.name))]
    except OSError:
        return []


@dataclass
class Entry:
    """One cached store, for `medclf cache list`."""

    path: Path
    nbytes: int
    last_used: float
    meta: dict


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


STORE_FILES = frozenset({"images.npy", "digests.npy", "meta.json"})
_KEY_NAME = re.compile(r"[0-9a-f]{20}")  # cache_key's form: only such folders are stores


def is_store_folder(folder: Path) -> bool:
    """A folder medclf made as a store: named like a cache key, holding nothing but a store's files.

    `clear` and `prune` delete only such folders, so a --cache-dir pointed at a folder of the user's
    never loses the user's files."""
    if not (_KEY_NAME.fullmatch(folder.name) and folder.is_dir()):
        return False
    try:
        return {p.name for p in folder.iterdir()} <= STORE_FILES
    except OSError:
        return False


def entries(root: Path) -> list[Entry]:
    """Every store under root (complete or half-deleted), least recently used first; other folders are not ours."""
    found = []
    try:
        folders = [p for p in root.iterdir() if is_store_folder(p)]
    except OSError:
        return []
    for folder in folders:
        meta_file = folder / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
            found.append(Entry(folder, _folder_bytes(folder), meta_file.stat().st_mtime, meta))
        except (OSError, ValueError):  # half-deleted or foreign folder: sized but never described
            found.append(Entry(folder, _folder_bytes(folder), 0.0, {}))
    return sorted(found, key=lambda e: e.last_used)


def mark_used(folder: Path) -> None:
    """Record a cache hit (meta.json's mtime) for least-recently-used eviction; a read-only cache just skips it."""
    try:
        os.utime(folder / "meta.json")
    except OSError:
        pass


def total_bytes(root: Path) -> int:
    """Bytes under root: stores plus temporary stores."""
    return sum(e.nbytes for e in entries(root)) + sum(_folder_bytes(t) for t in _tmp_dirs(root))


def clear(root: Path) -> tuple[int, int]:
    """Delete every store and every orphaned temporary store; returns (stores removed, bytes freed)."""
    return prune(root, 0)


def prune(root: Path, max_bytes: int) -> tuple[int, int]:
    """Delete orphaned temporary stores, then least recently used stores until the rest fit in max_bytes.

    Returns (stores removed, bytes freed). A store a running process has memory-mapped stays readable by it.
    """
    freed = remove_stale_tmps(root)
    stores = entries(root)
    total = sum(e.nbytes for e in stores)
    removed = 0
    for entry in stores:
        if total <= max_bytes:
            break
        shutil.rmtree(entry.path, ignore_errors=True)
        total -= entry.nbytes
        freed += entry.nbytes
        removed += 1
    return removed, freed


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
