"""The decoded store: each split decoded, converted and resized once into one uint8 N×C×H×W array.

Every epoch reuses it. Stores are cached on disk as .npy files (pixels and file digests; `cache.py` says exactly
what the cache key covers), so a second run starts in seconds; a cached store larger than the RAM budget
for data stays in its file and is read in chunks (`chunks.py`), so data larger than RAM still trains.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from ..errors import MedclfError
from . import cache as disk_cache
from . import dicom, npz
from .cache import cache_root
from .chunks import ChunkReader, data_ram_budget, release_pages, rows_per_block
from .sources import Source, Split, notice

# what PIL raises for a file it cannot decode; the bomb warning counts once `_bombs_are_errors` is in force
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
              Image.DecompressionBombWarning)


@dataclass
class Store:
    images: torch.Tensor | np.ndarray  # uint8 N×C×H×W; a numpy memmap when larger than the RAM budget
    labels: torch.Tensor  # int64 N, -1 where unknown
    ids: list[str]
    reader: ChunkReader | None = field(default=None, repr=False, compare=False)  # set for a cached memmap
    # the SHA-256 of every file of the split the store was decoded from (split order, N_split×32 uint8, zeros where
    # a file could not be read; skipped files included), for the exact-duplicate check; None for arrays (.npz)
    digests: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def chunk(self) -> int:
        """Images per read when the store is read from its file in chunks; 0 when it is in memory."""
        return self.reader.chunk if self.reader is not None else 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def block(self, rows: slice) -> Store:
        """The images of a contiguous range of rows as a store of their own, read as this store reads them: a
        store in its file keeps a chunk reader over just those rows (not a bare memory map)."""
        start, stop, step = rows.indices(len(self))
        assert step == 1, "a block is contiguous"
        reader = None
        if self.reader is not None:
            r = self.reader
            reader = ChunkReader(r.path, r.offset + start * r.row_bytes, (stop - start, *r.shape[1:]), r.chunk)
        return Store(self.images[start:stop], self.labels[start:stop], self.ids[start:stop], reader)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images at idx (a 1-D index tensor)."""
        if isinstance(self.images, torch.Tensor):  # on the host, or on the GPU it was placed on (placement.py)
            return self.images.index_select(0, idx.to(self.images.device))
        if self.reader is not None:
            return torch.from_numpy(self.reader.take(idx.numpy()))
        order = np.sort(idx.numpy())  # sorted reads are sequential on a memmap
        batch = torch.from_numpy(np.ascontiguousarray(self.images[order]))
        inverse = torch.from_numpy(np.searchsorted(order, idx.numpy()))
        return batch.index_select(0, inverse)


def decode_image(path: str, size: int) -> np.ndarray:
    """One image file as uint8 H×W (grayscale) or H×W×3 (colour), short side resized to size, centre-cropped.

    Images above PIL's `Image.MAX_IMAGE_PIXELS` are refused as unreadable before any pixel is decoded.
    DICOM files become 8-bit by `dicom.py`'s mapping, then take the same resize as any other image.
    """
    array = _decode_dicom(path, size) if dicom.is_dicom(path) else _decode_pil(path, size)
    if array.ndim == 3 and _is_gray(array):
        array = array[..., 0]
    return array


def _decode_pil(path: str, size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            _check_pixels(img)
            img.draft(None, (size, size))  # JPEG: decode at a reduced scale directly (much faster)
            img = ImageOps.exif_transpose(img)
            img = _to_8bit(img)
            if img.size != (size, size):
                img = _fit(img, size)
            return np.asarray(img)
    except UNREADABLE as exc:
        raise MedclfError(f"cannot read image {path}: {exc}") from None


def _decode_dicom(path: str, size: int) -> np.ndarray:
    width, height, _, _ = dicom.describe(path)
    try:
        _check_size(width, height)
        img = Image.fromarray(dicom.read_pixels(path))
    except Image.DecompressionBombError as exc:
        raise MedclfError(f"cannot read image {path}: {exc}") from None
    return np.asarray(img if img.size == (size, size) else _fit(img, size))


def _check_pixels(img: Image.Image) -> None:
    _check_size(*img.size)


def _check_size(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise Image.DecompressionBombError(f"{width}×{height} pixels is more than the "
                                           f"{limit} allowed (PIL.Image.MAX_IMAGE_PIXELS)")


@contextlib.contextmanager
def _bombs_are_errors() -> Iterator[None]:
    """Turn PIL's decompression-bomb warning into an error while decoding (set here, around the worker threads,
    because the warning filters are process-wide and not thread-safe to change from the workers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _fit(img: Image.Image, size: int) -> Image.Image:
    """Centre square crop of the short side, resized to size×size in one resampling step."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                      reducing_gap=2.0)


def _to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images (DICOM-like PNG/TIFF): stretch the used range to 0..255
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("LA", "1"):
        return img.convert("L")
    if img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if "A" in img.getbands() or img.mode == "P":
        # alpha: composite on black, the usual background of medical images
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _is_gray(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """H×W or H×W×3 → C×H×W with the requested channel count (luminance for colour → gray)."""
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
        if channels == 1 and array.shape[0] == 3:
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]
            array = (array * weights).sum(0, keepdims=True).round().astype(np.uint8)
    if channels == 3 and array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return array


def probe_folder_size(paths: list[str], sample: int = 200) -> int:
    """Median short side of up to `sample` images (header reads only)."""
    step = max(1, len(paths) // sample)
    sides = []
    for p in paths[::step][:sample]:
        try:
            if dicom.is_dicom(p):
                sides.append(min(dicom.describe(p)[:2]))
                continue
            with _bombs_are_errors(), Image.open(p) as img:
                sides.append(min(img.size))
        except (*UNREADABLE, MedclfError):
            continue
    return int(np.median(sides)) if sides else 224


def probe_channels(source: Source, split: Split, sample: int = 200) -> int:
    """3 if any sampled image holds real colour, else 1."""
    if source.kind == "npz":
        shape = source.load_npz()[f"{split.npz_key}_images"].shape
        return 3 if len(shape) == 4 and shape[-1] == 3 else 1
    step = max(1, len(split.paths) // sample)
    with _bombs_are_errors():
        for p in split.paths[::step][:sample]:
            try:
                if decode_image(p, 32).ndim == 3:
                    return 3
            except MedclfError:
                continue
    return 1


def native_size(source: Source) -> int:
    """The size images are stored at when the user asks for none."""
    if source.kind == "npz":
        split = next(iter(source.splits.values()))
        return int(source.load_npz()[f"{split.npz_key}_images"].shape[1])
    split = source.splits.get("train") or next(iter(source.splits.values()))
    return min(probe_folder_size(split.paths), 512)


def build_store(source: Source, split_name: str, size: int, channels: int, skip_bad: bool = False,
                cache: bool = True, cache_dir: str | None = None, desc: str | None = None) -> tuple[Store, list[str]]:
    """Decode one split (or load its pixels from the cache). Returns the store and the files skipped as unreadable.

    Labels and ids always come from `source`; the cache holds pixels and file digests (see `cache.py` for its key).
    """
    split = source.splits[split_name]
    desc = desc or split_name
    if not cache:
        images, keep, reasons, digests = _decode(source, split, np.empty((len(split), channels, size, size), np.uint8),
                                                 skip_bad, desc)
        return _store(images, split, keep, digests=digests), _skipped_paths(split, reasons)
    root = cache_root(cache_dir)
    folder = root / disk_cache.cache_key(split, source, size, channels)
    hit = _cache_hit(folder, split, skip_bad)
    if hit is not None:
        return hit
    disk_cache.remove_stale_tmps(root)
    return _decode_and_cache(source, split, size, channels, skip_bad, desc, root, folder)


def _store(images: np.ndarray | torch.Tensor, split: Split, keep: np.ndarray, reader: ChunkReader | None = None,
           digests: np.ndarray | None = None) -> Store:
    if isinstance(images, np.ndarray) and not isinstance(images, np.memmap):
        images = torch.from_numpy(images)
    ids = split.ids  # a property that builds the whole list: once, not once per image
    return Store(images, torch.from_numpy(split.labels[keep]), [ids[i] for i in keep], reader, digests)


def _cache_hit(folder: Path, split: Split, skip_bad: bool) -> tuple[Store, list[str]] | None:
    """The cached store for split, or None when there is none (or it is unreadable: it is then rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        skipped_rows = [int(i) for i in meta["skipped_rows"]]
        reasons = list(meta["skipped_reasons"])
        images, reader = _load_pixels(folder)
        digests = _load_digests(folder, len(split))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # damaged or from an older medclf: decode afresh
        shutil.rmtree(folder, ignore_errors=True)
        return None
    if skipped_rows and not skip_bad:  # answer exactly as a fresh decode without --skip-bad would
        raise MedclfError(reasons[0])
    keep = np.setdiff1d(np.arange(len(split)), skipped_rows)
    if len(images) != len(keep):
        shutil.rmtree(folder, ignore_errors=True)
        return None
    disk_cache.mark_used(folder)
    return _store(images, split, keep, reader, digests), _skipped_paths(split, dict.fromkeys(skipped_rows, ""))


def _decode_and_cache(source: Source, split: Split, size: int, channels: int, skip_bad: bool, desc: str,
                      root: Path, folder: Path) -> tuple[Store, list[str]]:
    """Decode straight into a reserved .npy in a temporary folder, then rename it into place.

    When the cache cannot be written (read-only, full disk) the split is decoded into memory instead.
    """
    shape = (len(split), channels, size, size)
    tmp = None
    try:
        tmp = disk_cache.new_tmp_dir(root)
        out = disk_cache.reserved_npy(tmp / "images.npy", shape) if source.kind == "folder" else np.empty(shape, np.uint8)
    except OSError as exc:
        _cache_unwritable(root, exc, tmp)
        tmp, out = None, np.empty(shape, np.uint8)
    try:
        images, keep, reasons, digests = _decode(source, split, out, skip_bad, desc)
    except BaseException:  # bad image, Ctrl-C: leave no half-written store behind
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp is not None:
        try:
            _finish_cache(tmp, folder, images, reasons, {"data": str(source.root), "split": desc, "size": size,
                                                         "channels": channels}, digests)
            cached = _cache_hit(folder, split, skip_bad=True)  # memory-mapped when large: this copy is dropped
            if cached is not None:
                return cached
        except OSError as exc:
            images = np.array(images)  # read the pixels back before their file goes
            _cache_unwritable(root, exc, tmp)
    return _store(np.asarray(images), split, keep, digests=digests), _skipped_paths(split, reasons)


def _skipped_paths(split: Split, reasons: dict[int, str]) -> list[str]:
    return [split.paths[i] for i in sorted(reasons)]


_warned_roots: set[str] = set()


def _cache_unwritable(root: Path, exc: OSError, tmp: Path | None) -> None:
    """Drop the temporary store and say once per cache folder that decoding goes to memory instead."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if str(root) not in _warned_roots:
        _warned_roots.add(str(root))
        reason = exc.strerror or type(exc).__name__
        notice(f"cannot write the decoded-image cache in {root} ({reason}); decoding into memory this run "
               "(free space, or pass --cache-dir or --no-cache)")


def _decode(source: Source, split: Split, out: np.ndarray, skip_bad: bool, desc: str):
    """Decode split into out; returns the kept images, kept indices, {row: reason} of the skipped files and the
    files' SHA-256 digests (None for an .npz)."""
    if source.kind == "npz":
        return _decode_npz(source, split, out.shape[-1], out.shape[1]), np.arange(len(split)), {}, None
    return _decode_files(split.paths, out, skip_bad, desc)


def _decode_npz(source: Source, split: Split, size: int, channels: int) -> np.ndarray:
    array = np.asarray(source.load_npz()[f"{split.npz_key}_images"][split.rows])
    array = npz.to_uint8(array, source.pixel_rules.get(split.npz_key, npz.AS_IS))
    array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(array))
    if channels == 1 and images.shape[1] == 3:
        images = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).round().byte()
    elif channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = resize_uint8(images, size)
    return np.ascontiguousarray(images.numpy())


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize a uint8 N×C×H×W tensor in chunks (antialiased bilinear)."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = y.round().clamp(0, 255).byte()
    return out


DECODE_TASK = 16  # images decoded per task: with small images, one task per image costs as much as its decode
PROCESS_MIN_IMAGES = 2000  # splits from this size decode in worker processes where the platform forks
DIGEST_BYTES = 32  # SHA-256


def _decode_rows(paths: list[str], size: int, channels: int, skip_bad: bool
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Decode a run of files: (pixels len×C×S×S, SHA-256 of each file's bytes len×32 with zeros where the file
    cannot be read, {offset: reason} of the files skipped as unreadable). The digest is taken here, from the file
    the decode reads anyway (then in the page cache), so that the exact-duplicate check reads no file again."""
    pixels = np.zeros((len(paths), channels, size, size), np.uint8)
    digests = np.zeros((len(paths), DIGEST_BYTES), np.uint8)
    reasons: dict[int, str] = {}
    for i, path in enumerate(paths):
        with contextlib.suppress(OSError):  # a file that cannot be read: the decoder below says why
            digests[i] = np.frombuffer(hashlib.sha256(Path(path).read_bytes()).digest(), np.uint8)
        try:
            pixels[i] = _to_channels(decode_image(path, size), channels)
        except MedclfError as exc:
            if not skip_bad:
                raise
            reasons[i] = str(exc)
    return pixels, digests, reasons


def _worker_start() -> None:
    """A decode process: PIL's decompression-bomb warning is an error there for its whole life, and Ctrl-C is left
    to the parent (it reaches the whole process group), which drops the queued work and cleans up."""
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent answers it


def _decode_pool(n_images: int) -> Executor:
    """Worker processes for a large split on Linux (fork: they start at once and share the loaded modules;
    decoding small files is mostly Python work that threads would serialise on the GIL); threads otherwise."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_images >= PROCESS_MIN_IMAGES and cpus > 1 and sys.platform.startswith("linux"):
        return ProcessPoolExecutor(min(8, cpus), mp_context=multiprocessing.get_context("fork"),
                                   initializer=_worker_start)
    return ThreadPoolExecutor(min(8, cpus * 2))  # PIL releases the GIL while decoding


def _decode_files(paths: list[str], images: np.ndarray, skip_bad: bool, desc: str):
    """Decode every file into images (N×C×S×S); returns the kept images, kept indices, {row: reason} skipped, and
    every file's SHA-256 (N×32, zeros where unreadable)."""
    channels, size = images.shape[1], images.shape[-1]
    reasons: dict[int, str] = {}
    digests = np.zeros((len(paths), DIGEST_BYTES), np.uint8)
    block = rows_per_block(images)  # a memory map is written block by block, each block's pages then released
    pool = _decode_pool(len(paths))
    try:
        with _bombs_are_errors(), tqdm(total=len(paths), desc=f"decode {desc}", unit="img", leave=False,
                                       disable=len(paths) < 500) as bar:
            for start in range(0, len(paths), block):
                stop = min(len(paths), start + block)
                firsts = range(start, stop, DECODE_TASK)
                runs = [paths[i:min(stop, i + DECODE_TASK)] for i in firsts]
                done = pool.map(_decode_rows, runs, *([x] * len(runs) for x in (size, channels, skip_bad)))
                for first, (pixels, run_digests, failed) in zip(firsts, done):
                    images[first:first + len(pixels)] = pixels
                    digests[first:first + len(pixels)] = run_digests
                    reasons.update({first + i: reason for i, reason in failed.items()})
                    bar.update(len(pixels))
                release_pages(images, start, stop)
    finally:  # a bad image or Ctrl-C: queued work is dropped, not decoded before the error is answered
        pool.shutdown(wait=True, cancel_futures=True)
    keep = np.setdiff1d(np.arange(len(paths)), list(reasons))
    if skip_bad and not len(keep):
        raise MedclfError(f"every image in the {desc} split is unreadable")
    return (images if len(keep) == len(paths) else np.asarray(images[keep])), keep, reasons, digests


def _finish_cache(tmp: Path, folder: Path, images: np.ndarray, reasons: dict[int, str], described: dict,
                  digests: np.ndarray | None = None) -> None:
    """Complete the temporary store and rename it into place (the rename makes the whole store appear at once)."""
    if digests is not None:
        np.save(tmp / "digests.npy", digests)
    path = tmp / "images.npy"
    if isinstance(images, np.memmap) and images.filename and Path(images.filename) == path.resolve():
        images.flush()
    else:
        np.save(path, images)
    rows = sorted(reasons)
    meta = {"version": disk_cache.CACHE_VERSION, "shape": list(images.shape), **described,
            "skipped_rows": rows, "skipped_reasons": [reasons[i] for i in rows], "created": time.time()}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same store first


def _load_digests(folder: Path, n: int) -> np.ndarray | None:
    """The cached files' digests; None where the store has none (an .npz, or cached by an earlier medclf)."""
    path = folder / "digests.npy"
    if not path.is_file():
        return None
    digests = np.load(path)
    if digests.shape != (n, DIGEST_BYTES):
        raise ValueError(f"{path}: {digests.shape} digests for {n} files")
    return digests


def _load_pixels(folder: Path) -> tuple[torch.Tensor | np.ndarray, ChunkReader | None]:
    """The cached pixels: read into RAM when they fit the budget for data, else left in the file with
    a reader of its chunks."""
    path = folder / "images.npy"
    images = np.load(path, mmap_mode="r")  # the header only: nothing is read yet
    budget = data_ram_budget()
    if images.nbytes <= budget:
        return torch.from_numpy(np.load(path)), None  # read straight into one array, no mapped copy
    return images, ChunkReader.of(images, budget)
