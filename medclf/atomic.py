"""Atomic file writes: every artifact is either complete or absent, never half-written.

Each writer writes to a temporary file in the destination's folder (same filesystem), flushes it,
then `os.replace`s it over the destination, so a Ctrl-C, a kill or a full disk during the write
leaves the previous file (or none) in place. On failure the temporary file is removed.
A full disk (ENOSPC/EDQUOT) becomes one `MedclfError` line naming the file and the free space left.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .errors import MedclfError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the filesystem holding path (or its nearest existing parent), None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full_error(path: str | os.PathLike, needed: int | None = None) -> MedclfError:
    free = free_bytes(Path(path).parent)
    need = f"; about {needed / 1e6:.1f} MB needed" if needed else ""
    have = f"{free / 1e6:.1f} MB free" if free is not None else "free space unknown"
    return MedclfError(f"disk full writing {path} ({have}{need}); free some space and re-run (or --resume)")


NEARLY_FULL = 1 << 20  # bytes free below which a failed write is taken to be a full disk


def is_disk_full(exc: BaseException, where: str | os.PathLike | None = None) -> bool:
    """True for a write that failed because the disk is full. `where`: the folder written to, checked
    (before the partial file is removed) when torch's writer failed without naming the cause."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    if not isinstance(exc, RuntimeError):
        return False
    # torch.save reports a failed write as RuntimeError from its zip writer, with the errno in the text
    text = str(exc)
    if "No space left" in text or "file write failed" in text:
        return True
    # on a full tmpfs the writer says only "unexpected pos" or "iostream error": look at the free space
    vague = "unexpected pos" in text or "iostream error" in text
    free = free_bytes(where) if vague and where is not None else None
    return free is not None and free < NEARLY_FULL


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any failure it is removed.

    A missing parent folder is created (an --out path into a new folder is clearly meant). `needed`
    (bytes, an estimate) goes into the disk-full message. A path that cannot be written at all
    (a parent that is a file, no permission) is one MedclfError line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, needed) from None
        raise MedclfError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = is_disk_full(exc, path.parent)  # before the partial file frees its space
        tmp_path.unlink(missing_ok=True)
        if full:
            raise disk_full_error(path, needed) from None
        if isinstance(exc, IsADirectoryError):
            raise MedclfError(f"cannot write {path}: it is a folder; give a file name") from None
        raise


def write_with(path: str | os.PathLike, write: Callable[[Path], Any], needed: int | None = None) -> Path:
    """Call write(tmp_path) and move the result over path atomically."""
    with atomic_path(path, needed) as tmp:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode("utf-8")  # every text medclf writes (YAML, JSON, CSV, HTML) is UTF-8, whatever the locale
    return write_with(path, lambda tmp: tmp.write_bytes(data), needed=len(data))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data), needed=len(data))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside a (nested) checkpoint dict: about the size torch.save writes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return write_with(path, lambda tmp: torch.save(obj, tmp), needed=tensor_bytes(obj))


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`with open_atomic("x.csv", newline="") as f:` writes x.csv atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
