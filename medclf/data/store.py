"""The decoded store: each split decoded, converted and resized once into one uint8 N×C×H×W array.

Every epoch reuses it. Stores are cached on disk as .npy files keyed by a fingerprint of the source
files (paths, sizes, mtimes) and the preprocessing, and memory-mapped when larger than half the
available RAM, so a second run starts in seconds and data larger than RAM still trains.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from ..errors import MedclfError
from .sources import Source, Split

CACHE_VERSION = 1


@dataclass
class Store:
    images: torch.Tensor | np.ndarray  # uint8 N×C×H×W; a numpy memmap when larger than RAM allows
    labels: torch.Tensor  # int64 N, -1 where unknown
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images at idx (a 1-D index tensor)."""
        if isinstance(self.images, torch.Tensor):
            return self.images.index_select(0, idx)
        order = np.sort(idx.numpy())  # sorted reads are sequential on a memmap
        batch = torch.from_numpy(np.ascontiguousarray(self.images[order]))
        inverse = torch.from_numpy(np.searchsorted(order, idx.numpy()))
        return batch.index_select(0, inverse)


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    from .named import data_home

    return data_home() / "stores"


def decode_image(path: str, size: int) -> np.ndarray:
    """One image file as uint8 H×W (grayscale) or H×W×3 (colour), short side resized to size, centre-cropped."""
    try:
        with Image.open(path) as img:
            img.draft(None, (size, size))  # JPEG: decode at a reduced scale directly (much faster)
            img = ImageOps.exif_transpose(img)
            img = _to_8bit(img)
            if img.size != (size, size):
                img = _fit(img, size)
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MedclfError(f"cannot read image {path}: {exc}") from None
    if array.ndim == 3 and _is_gray(array):
        array = array[..., 0]
    return array


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
            with Image.open(p) as img:
                sides.append(min(img.size))
        except (UnidentifiedImageError, OSError):
            continue
    return int(np.median(sides)) if sides else 224


def probe_channels(source: Source, split: Split, sample: int = 200) -> int:
    """3 if any sampled image holds real colour, else 1."""
    if source.kind == "npz":
        return 3 if source.load_npz()[f"{split.npz_key}_images"].ndim == 4 else 1
    step = max(1, len(split.paths) // sample)
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


def fingerprint(split: Split, source: Source, size: int, channels: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{size}|{channels}|{source.kind}".encode())
    if split.paths is not None:
        for p in split.paths:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    else:
        st = os.stat(source.root)
        h.update(f"{Path(source.root).resolve()}|{st.st_size}|{st.st_mtime_ns}|{split.npz_key}".encode())
        h.update(np.ascontiguousarray(split.rows).tobytes())
    return h.hexdigest()[:20]


def build_store(source: Source, split_name: str, size: int, channels: int, skip_bad: bool = False,
                cache: bool = True, cache_dir: str | None = None, desc: str | None = None) -> tuple[Store, list[str]]:
    """Decode one split (or load it from the cache). Returns the store and the files skipped as unreadable."""
    split = source.splits[split_name]
    folder = cache_root(cache_dir) / fingerprint(split, source, size, channels) if cache else None
    if folder is not None and (folder / "meta.json").is_file():
        return _load_cached(folder), json.loads((folder / "meta.json").read_text())["skipped"]
    tmp = _new_cache_dir(folder) if folder is not None else None
    shape = (len(split), channels, size, size)
    try:
        if source.kind == "npz":
            images, keep, skipped = _decode_npz(source, split, size, channels), np.arange(len(split)), []
        else:
            # decode straight into the on-disk array when caching, so RAM never holds a second copy
            out = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, shape) if tmp else np.empty(shape, np.uint8)
            images, keep, skipped = _decode_files(split.paths, out, skip_bad, desc or split_name)
    except BaseException:  # bad image, Ctrl-C: leave no half-written store behind
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    labels = split.labels[keep]
    ids = [split.ids[i] for i in keep]
    if tmp is None:
        return Store(torch.from_numpy(np.asarray(images)), torch.from_numpy(labels), ids), skipped
    try:
        _finish_cache(tmp, folder, images, labels, ids, skipped)
        return _load_cached(folder), skipped
    except OSError:  # a full or read-only disk costs speed next time, never this run
        shutil.rmtree(tmp, ignore_errors=True)
        return Store(torch.from_numpy(np.array(images)), torch.from_numpy(labels), ids), skipped


def _decode_npz(source: Source, split: Split, size: int, channels: int) -> np.ndarray:
    array = np.asarray(source.load_npz()[f"{split.npz_key}_images"][split.rows])
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


def _decode_files(paths: list[str], images: np.ndarray, skip_bad: bool, desc: str):
    """Decode every file into images (N×C×S×S); returns the kept images, kept indices and skipped paths."""
    channels, size = images.shape[1], images.shape[-1]
    ok = np.ones(len(paths), dtype=bool)

    def work(i: int) -> None:
        try:
            images[i] = _to_channels(decode_image(paths[i], size), channels)
        except MedclfError:
            if not skip_bad:
                raise
            ok[i] = False

    threads = min(8, (os.cpu_count() or 1) * 2)  # PIL releases the GIL while decoding
    with ThreadPoolExecutor(threads) as pool:
        for _ in tqdm(pool.map(work, range(len(paths))), total=len(paths), desc=f"decode {desc}",
                      unit="img", leave=False, disable=len(paths) < 500):
            pass
    keep = np.flatnonzero(ok)
    skipped = [paths[i] for i in np.flatnonzero(~ok)]
    if skip_bad and not len(keep):
        raise MedclfError(f"every image in the {desc} split is unreadable")
    return (images if len(keep) == len(paths) else images[keep]), keep, skipped


def _new_cache_dir(folder: Path) -> Path | None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError:
        return None


def _finish_cache(tmp: Path, folder: Path, images: np.ndarray, labels: np.ndarray, ids: list[str],
                  skipped: list[str]) -> None:
    if isinstance(images, np.memmap) and Path(images.filename) == tmp / "images.npy":
        images.flush()
    else:
        np.save(tmp / "images.npy", images)
    np.save(tmp / "labels.npy", labels)
    (tmp / "ids.json").write_text(json.dumps(ids))
    (tmp / "meta.json").write_text(json.dumps({"shape": list(images.shape), "skipped": skipped}))
    if folder.exists():  # another process finished the same store first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)  # atomic: an interrupted run never leaves a half-written store


def _load_cached(folder: Path) -> Store:
    images = np.load(folder / "images.npy", mmap_mode="r")
    available = _available_ram()
    if images.nbytes < available / 2:
        images = torch.from_numpy(np.array(images))  # fits: read it into RAM once
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    ids = json.loads((folder / "ids.json").read_text())
    return Store(images, labels, ids)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
