"""Where the decoded images live while a model trains or predicts on a GPU, and how a batch gets there.

The uint8 store is copied to the GPU once when it fits in a share of the device's free memory
(`GPU_STORE_FRACTION`); each step then gathers its batch on the GPU and the host copies nothing.
When it does not fit, each batch is gathered on the host straight into pinned (page-locked) memory
and copied with `non_blocking=True`: the training loop never waits for the GPU, so the host gathers
batch k+1 while the GPU still runs step k, which is what a DataLoader's workers would buy. On the
CPU (and MPS) the store stays where it is and batches are plain index selections.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .store import Store

# share of the GPU's free memory the stores may take: the rest stays for the model, its optimizer state,
# activations at the largest batch, and cuDNN's workspaces
GPU_STORE_FRACTION = 0.5
COPY_CHUNK_BYTES = 1 << 28  # a memory-mapped store moves to the GPU in pieces of this size: host memory stays bounded


@dataclass(frozen=True)
class Placement:
    on_device: bool
    reason: str  # one line the run prints


def decide_placement(nbytes: int, device: torch.device, copies: int = 1,
                     fraction: float = GPU_STORE_FRACTION) -> Placement:
    """Whether `nbytes` of decoded images go to `device` once (`copies` of them live there at the same time,
    e.g. cross-validation's pooled store and a fold's parts), with the reason."""
    if device.type != "cuda":
        return Placement(False, f"decoded images stay in host memory ({device.type})")
    free, _ = torch.cuda.mem_get_info(device)
    needed = nbytes * copies
    what = f"{_gib(needed)} of decoded images" + (f" ({copies} copies)" if copies > 1 else "")
    room = f"{fraction:.0%} of the GPU's {_gib(free)} free"
    if needed <= fraction * free:
        return Placement(True, f"{what} fit in {room}: copied to the GPU once, batches gathered there")
    return Placement(False, f"{what} exceed {room}: batches gathered in pinned host memory, copied without blocking")


def place_stores(stores: dict[str, Store], names: tuple[str, ...], device: torch.device, copies: int = 1
                 ) -> tuple[dict[str, Store], Placement]:
    """`stores` with those in `names` (the splits read every epoch) moved to `device` when together they fit."""
    moved = [name for name in names if name in stores]
    placement = decide_placement(sum(_nbytes(stores[name]) for name in moved), device, copies)
    if not placement.on_device:
        return stores, placement
    return {name: to_device(store, device) if name in moved else store for name, store in stores.items()}, placement


def to_device(store: Store, device: torch.device) -> Store:
    """The store with its images on `device` (labels and ids stay on the host, where metrics read them)."""
    images = store.images
    if isinstance(images, torch.Tensor):
        return dataclasses.replace(store, images=images.to(device))
    moved = torch.empty(images.shape, dtype=torch.uint8, device=device)  # a memory-mapped store: piece by piece
    rows = max(1, COPY_CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), rows):
        moved[start:start + rows].copy_(torch.from_numpy(np.ascontiguousarray(images[start:start + rows])))
    return dataclasses.replace(store, images=moved)


def is_on(store: Store, device: torch.device) -> bool:
    """Whether the store's images already sit in `device`'s memory (never true for the CPU: nothing to move)."""
    return device.type != "cpu" and isinstance(store.images, torch.Tensor) and store.images.device.type == device.type


def images_on_device(store: Store, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The uint8 images at idx (a 1-D CPU index tensor) on `device`, without waiting for the device."""
    if is_on(store, device):
        return store.images.index_select(0, _pinned(idx, device).to(device, non_blocking=True))
    if device.type == "cuda":
        return _gather_pinned(store, idx).to(device, non_blocking=True)
    return store.take(idx).to(device, non_blocking=True)


def batch_on_device(store: Store, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels at idx on `device`; see `images_on_device`."""
    labels = store.labels.index_select(0, idx)
    return images_on_device(store, idx, device), _pinned(labels, device).to(device, non_blocking=True)


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor bound for a CUDA device, in pinned memory: a non-blocking copy from pageable memory would
    first be staged by the driver, which can wait on the GPU."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def _gather_pinned(store: Store, idx: torch.Tensor) -> torch.Tensor:
    """The batch gathered straight into pinned memory (one copy, not a gather and then a pinning copy).
    PyTorch's pinned-memory cache reuses the buffer only once the GPU's copy out of it has finished."""
    if isinstance(store.images, torch.Tensor):
        out = torch.empty((len(idx), *store.images.shape[1:]), dtype=store.images.dtype, pin_memory=True)
        return torch.index_select(store.images, 0, idx, out=out)
    return store.take(idx).pin_memory()


def _nbytes(store: Store) -> int:
    images = store.images
    return images.numel() * images.element_size() if isinstance(images, torch.Tensor) else int(images.nbytes)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
