"""Stores larger than the RAM budget for data: read from their cache file in large sequential chunks.

A cached store that does not fit the budget (`data_ram_budget`) stays in its .npy file. Its images are
read by explicit reads into a fixed set of reused chunk buffers (`ChunkReader`), not through the memory
map: a mapped page counts in the process's resident memory until the kernel evicts it, so reading a
large file through the map grows RSS towards the file's size, while the buffers keep it at their own.
Each training epoch visits the chunks in a random order, `MIX` at a time, shuffling the images of those
chunks together (`chunked_order`): every chunk is read once per epoch, and a batch still draws from
`MIX` places in the file. Decoding into the cache file through its memory map releases each finished
block's pages (`release_pages`), so a first run is bounded as well.
"""
from __future__ import annotations

import math
import mmap
import os
import threading
import weakref

import numpy as np
import torch

from ..errors import MedclfError

RAM_ENV = "MEDCLF_DATA_RAM_GB"
CHUNK_BYTES = 4 << 20  # long enough for sequential disk speed, short enough that MIX of them mix well
# chunks shuffled together: with classes stored one after another (folders), a window of MIX random
# chunks varies in class mix about as much as MIX randomly drawn images, i.e. like a batch does
MIX = 32
SLOTS = 2 * MIX  # a batch at the boundary of two windows needs the chunks of both


def data_ram_budget() -> int:
    """Bytes of RAM a decoded store may take before it stays on disk: $MEDCLF_DATA_RAM_GB (GiB) when set,
    else half the RAM available now."""
    given = os.environ.get(RAM_ENV, "").strip()
    if not given:
        return available_ram() // 2
    try:
        gib = float(given)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib >= 0):
        raise MedclfError(f"{RAM_ENV}={given!r}: expected the RAM for decoded images in GiB, a number >= 0 "
                          "(e.g. 4 or 0.5)")
    return int(gib * (1 << 30))


def available_ram() -> int:
    """MemAvailable (Linux); 8 GiB where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def rows_per_chunk(row_bytes: int, budget: int) -> int:
    """Images per chunk: CHUNK_BYTES' worth, fewer when the budget cannot hold SLOTS chunks; at least one."""
    return max(1, min(CHUNK_BYTES, budget // SLOTS) // max(1, row_bytes))


def rows_per_block(images: np.ndarray) -> int:
    """Rows to decode before `release_pages`: a whole store in memory; for a memory map, CHUNK_BYTES × MIX
    worth, or a quarter of the budget when that is less."""
    if not isinstance(images, np.memmap):
        return max(1, len(images))
    return max(1, min(CHUNK_BYTES * MIX, data_ram_budget() // 4) // max(1, images.strides[0]))


def release_pages(images: np.ndarray, start: int, stop: int) -> None:
    """Drop rows start..stop of a store written through a memory map (np.memmap, as opened) from this
    process's resident memory: the rows stay in the file and the page cache, and are read back from
    there if touched again. Anything else is left alone."""
    mapping = getattr(images, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    skip = images.offset % mmap.ALLOCATIONGRANULARITY  # np.memmap maps from an aligned offset before the data
    first, last = skip + start * images.strides[0], skip + stop * images.strides[0]
    first -= first % mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, min(last, len(mapping)) - first)


def chunked_order(draw: torch.Tensor, chunk: int, generator: torch.Generator) -> torch.Tensor:
    """The indices of `draw` (a permutation, or a class-balanced sample with replacement) reordered to be read
    in chunks of `chunk` rows: chunks in a random order, the indices of each MIX consecutive chunks shuffled
    together. Every index keeps its count, so a sample keeps its class balance."""
    n_chunks = int(draw.max()) // chunk + 1 if len(draw) else 0
    shuffled = draw[torch.randperm(len(draw), generator=generator)]
    position = torch.empty(n_chunks, dtype=torch.long)
    position[torch.randperm(n_chunks, generator=generator)] = torch.arange(n_chunks)
    window = position[shuffled // chunk] // MIX
    return shuffled[torch.sort(window, stable=True).indices]


class ChunkReader:
    """Rows of a C-ordered uint8 array in a file (N×…, from byte `offset`), read in chunks of `chunk` rows
    into SLOTS reused buffers (the least recently used is replaced). A batch spread over more than SLOTS
    chunks is read row by row instead (runs of adjacent rows in one read)."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], chunk: int):
        self.path, self.offset, self.shape, self.chunk = str(path), int(offset), tuple(shape), int(chunk)
        self.row_bytes = int(np.prod(shape[1:]))
        self.loads = 0  # chunks read so far: every chunk once per epoch is the goal
        self._buffers: list[np.ndarray] = []
        self._chunk_in: list[int] = []  # the chunk each buffer holds
        self._last_used: list[int] = []
        self._clock = 0
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    @classmethod
    def of(cls, images: np.memmap, budget: int) -> ChunkReader:
        """A reader of the file behind a memory map opened by np.load (the whole array, from its header's end)."""
        row_bytes = int(np.prod(images.shape[1:]))
        return cls(images.filename, images.offset, images.shape, rows_per_chunk(row_bytes, budget))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """The rows at idx (1-D integers), in that order."""
        with self._lock:
            chunks = idx // self.chunk
            needed = np.unique(chunks)
            if len(needed) > SLOTS:
                return self._read_rows(idx)
            out = np.empty((len(idx), *self.shape[1:]), np.uint8)
            # held chunks first, so a chunk still to be used by this batch is never the one replaced
            for c in sorted(needed.tolist(), key=lambda c: c not in self._chunk_in):
                rows = chunks == c
                out[rows] = self._held(c)[idx[rows] - c * self.chunk]
            return out

    def _held(self, c: int) -> np.ndarray:
        """Chunk c's rows, read into a buffer unless one already holds them."""
        self._clock += 1
        if c in self._chunk_in:
            slot = self._chunk_in.index(c)
        elif len(self._buffers) < SLOTS:
            slot = len(self._buffers)
            self._buffers.append(np.empty((self.chunk, *self.shape[1:]), np.uint8))
            self._chunk_in.append(-1)
            self._last_used.append(0)
        else:
            slot = int(np.argmin(self._last_used))
        if self._chunk_in[slot] != c:
            self._chunk_in[slot] = -1  # a failed read leaves no stale chunk behind
            first = c * self.chunk
            self._read_into(self._buffers[slot][:min(self.chunk, self.shape[0] - first)], first)
            self._chunk_in[slot] = c
            self.loads += 1
        self._last_used[slot] = self._clock
        return self._buffers[slot]

    def _read_rows(self, idx: np.ndarray) -> np.ndarray:
        order = np.argsort(idx, kind="stable")
        ranked = idx[order]
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        starts = np.flatnonzero(np.diff(ranked, prepend=-2) != 1)  # where a run of adjacent rows begins
        for start, end in zip(starts, [*starts[1:], len(ranked)]):
            self._read_into(out[start:end], int(ranked[start]))
        unsorted = np.empty_like(out)
        unsorted[order] = out
        return unsorted

    def _read_into(self, rows: np.ndarray, first: int) -> None:
        view = memoryview(rows.reshape(-1))
        position = self.offset + first * self.row_bytes
        done = 0
        while done < len(view):
            got = _pread_into(self._fd, view[done:], position + done)
            if got == 0:
                raise MedclfError(f"the decoded-image cache file {self.path} is shorter than its header says "
                                  "(changed while in use?); clear it with `medclf cache clear` and run again")
            done += got


def _pread_into(fd: int, view: memoryview, position: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], position)
    data = os.pread(fd, len(view), position)  # systems without preadv: one copy more
    view[:len(data)] = data
    return len(data)
