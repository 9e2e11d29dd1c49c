"""Data larger than the RAM budget (issue #13 part 3): the store stays in its file and is read in chunks."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import medclf
from medclf import training
from medclf.cli import main
from medclf.data import sources
from medclf.data.chunks import MIX, RAM_ENV, ChunkReader, data_ram_budget
from medclf.data.store import Store, build_store

from conftest import make_split_folder, write_class_folders

ROOT = Path(__file__).resolve().parents[1]


TRAIN = 260  # train images in `many_images`: more than the reader's 2 × MIX chunks of CHUNK images
CHUNK = 4
ROW_BYTES = 12 * 12


def many_images(root: Path) -> Path:
    """A split folder with enough train images for a 12 px store larger than a budget of 2 × MIX chunks."""
    write_class_folders(root / "train", {"NORMAL": TRAIN // 2, "PNEUMONIA": TRAIN // 2}, seed=1)
    write_class_folders(root / "val", {"NORMAL": 8, "PNEUMONIA": 8}, seed=2)
    return root


def chunked_budget(monkeypatch) -> None:
    """$MEDCLF_DATA_RAM_GB that leaves a 12 px store of TRAIN images on disk, read in chunks of CHUNK images."""
    budget = 2 * MIX * CHUNK * ROW_BYTES
    assert budget < TRAIN * ROW_BYTES
    monkeypatch.setenv(RAM_ENV, repr(budget / (1 << 30)))


def write_npy(path: Path, n: int, row_shape: tuple[int, ...]) -> Path:
    """A uint8 .npy whose image i is filled with i % 251, written in blocks (no memory map, no whole copy)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, *row_shape)})
        for start in range(0, n, 1000):
            rows = np.arange(start, min(n, start + 1000)) % 251
            f.write(np.broadcast_to(rows.astype(np.uint8).reshape(-1, *[1] * len(row_shape)),
                                    (len(rows), *row_shape)).tobytes())
    return path


def reader_of(path: Path, chunk: int) -> ChunkReader:
    images = np.load(path, mmap_mode="r")
    return ChunkReader(images.filename, images.offset, images.shape, chunk)


def read_epoch(reader: ChunkReader, order: torch.Tensor, batch: int) -> None:
    for idx in order.split(batch):
        images = reader.take(idx.numpy())
        assert np.array_equal(images[:, 0, 0, 0], (idx.numpy() % 251).astype(np.uint8))


def test_chunked_order_is_a_permutation_that_reads_each_chunk_once(tmp_path):
    n, chunk = 1000, 7
    reader = reader_of(write_npy(tmp_path / "s.npy", n, (1, 2, 2)), chunk)
    gen = torch.Generator().manual_seed(0)
    order = training.epoch_order(n, torch.zeros(n, dtype=torch.long), "none", 2, gen, chunk)
    assert torch.equal(order.sort().values, torch.arange(n))
    read_epoch(reader, order, 16)
    assert reader.loads == math.ceil(n / chunk)
    shuffled = reader_of(tmp_path / "s.npy", chunk)  # the same reads in a per-image random order
    read_epoch(shuffled, torch.randperm(n, generator=gen), 16)
    assert shuffled.loads > 3 * reader.loads


def test_each_rank_of_a_sharded_chunked_order_reads_each_chunk_once(tmp_path):
    n, chunk, world = 1000, 7, 2
    path = write_npy(tmp_path / "s.npy", n, (1, 2, 2))
    order = training.epoch_order(n, torch.zeros(n, dtype=torch.long), "none", 2, torch.Generator().manual_seed(1), chunk)
    for rank in range(world):
        reader = reader_of(path, chunk)
        shard = order[rank::world]
        read_epoch(reader, shard, 16)
        assert reader.loads == len(torch.unique(shard // chunk))  # each chunk of the shard once


def test_a_block_of_a_disk_store_reads_its_rows_through_a_chunk_reader(tmp_path):
    """What each rank predicts under torchrun (distributed.block): the same images, read in chunks, not through
    a bare memory map."""
    n = 100
    images = np.load(write_npy(tmp_path / "s.npy", n, (1, 2, 2)), mmap_mode="r")
    store = Store(images, torch.arange(n), [f"i{k}" for k in range(n)], reader_of(tmp_path / "s.npy", 16))
    part = store.block(slice(37, 81))
    assert part.reader is not None and part.chunk == 16 and len(part) == 44 and part.ids[0] == "i37"
    idx = torch.tensor([43, 0, 5, 20])
    assert np.array_equal(part.take(idx).numpy(), store.take(idx + 37).numpy())
    assert part.take(idx)[:, 0, 0, 0].tolist() == [(k + 37) % 251 for k in idx.tolist()]
    assert part.labels.tolist() == list(range(37, 81))
    in_memory = Store(torch.from_numpy(np.array(images)), torch.arange(n), [f"i{k}" for k in range(n)])
    assert torch.equal(in_memory.block(slice(37, 81)).take(idx), part.take(idx))


def test_chunked_order_keeps_the_class_balanced_sample_and_mixes_chunks():
    n, chunk = 1000, 7
    labels = (torch.arange(n) >= 900).long()  # classes stored one after the other, as folders are
    plain = training.epoch_order(n, labels, "sample", 2, torch.Generator().manual_seed(3))
    chunked = training.epoch_order(n, labels, "sample", 2, torch.Generator().manual_seed(3), chunk)
    assert torch.equal(plain.sort().values, chunked.sort().values)  # the same draw, only reordered
    assert abs(float(labels[chunked].float().mean()) - 0.5) < 0.1
    distinct = [len(torch.unique(idx // chunk)) for idx in chunked.split(16)]
    assert np.median(distinct) >= 8  # a batch draws from many chunks, not from one run of images


def test_disk_store_gives_the_same_images_labels_and_ids_as_in_memory(tmp_path, monkeypatch):
    source = sources.open_source(many_images(tmp_path / "xray"))
    memory, _ = build_store(source, "train", 12, 1, cache=False)
    chunked_budget(monkeypatch)
    disk, _ = build_store(source, "train", 12, 1, cache_dir=str(tmp_path / "c"))
    assert isinstance(disk.images, np.memmap) and disk.chunk == CHUNK
    assert torch.equal(disk.labels, memory.labels) and disk.ids == memory.ids
    scattered = torch.tensor([259, 3, 3, 130, 0, 258, 11])
    assert torch.equal(disk.take(scattered), memory.take(scattered))
    everything = torch.cat([torch.arange(TRAIN - 1, -1, -1), torch.tensor([5, 5, 100])])
    assert torch.equal(disk.take(everything), memory.take(everything))  # more chunks than buffers: row reads


def test_training_reads_a_disk_store_chunk_by_chunk(tmp_path, monkeypatch):
    chunked_budget(monkeypatch)
    loads = []
    real = training.train_one_epoch

    def counted(model, store, order, *args, **kwargs):
        before = store.reader.loads
        result = real(model, store, order, *args, **kwargs)
        loads.append((store.reader.loads - before, store.chunk))
        return result

    monkeypatch.setattr(training, "train_one_epoch", counted)
    result = medclf.train(data=str(many_images(tmp_path / "xray")), out=str(tmp_path / "run"), epochs=1,
                          batch_size=64, patience=0, plan=False, size=12, augment="none", progress=False)
    assert loads == [(math.ceil(TRAIN / CHUNK), CHUNK)]  # the epoch read each chunk exactly once
    assert 0 <= result["metrics"]["val"]["accuracy"] <= 1


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from pathlib import Path
    from medclf.data import store
    from medclf.data.cache import reserved_npy
    from medclf.data.chunks import chunked_order

    def peak_growth_kb(work):
        open("/proc/self/clear_refs", "w").write("5")  # the peak restarts from the current resident size
        start = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
        work()
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) - start

    folder, n, plain = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "plain"
    if plain:  # no page released after decoding into the map
        store.release_pages = lambda *args: None
    store.decode_image = lambda path, size: np.full((size, size), int(path) % 251, np.uint8)  # decoding is not measured

    def decode():
        out = reserved_npy(folder / "images.npy", (n, 1, 224, 224))
        store._decode_files([str(i) for i in range(n)], out, False, "test")
        out.flush()

    def read():
        images, reader = store._load_pixels(folder)
        gen = torch.Generator().manual_seed(0)
        for idx in chunked_order(torch.randperm(n, generator=gen), reader.chunk, gen).split(64):
            if plain:  # reads through the memory map
                batch = np.asarray(images[np.sort(idx.numpy())])[:, 0, 0, 0]
                assert (np.sort(batch) == np.sort(idx.numpy() % 251)).all()
            else:
                assert (reader.take(idx.numpy())[:, 0, 0, 0] == idx.numpy() % 251).all()

    print(peak_growth_kb(decode), peak_growth_kb(read))
""")


def test_decoding_and_reading_a_disk_store_keep_peak_memory_bounded(tmp_path):
    """A 200 MB store decoded into the cache, then read in full with a 20 MB budget: each grows peak RSS by less
    than a quarter of the file, where writing and reading through the memory map grow it by most of the file."""
    n = 4000
    file_mb = n * 224 * 224 / 1e6

    def growth_mb(how: str) -> list[float]:
        folder = tmp_path / how
        folder.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT), RAM_ENV: "0.02"}
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), str(n), how], env=env,
                              capture_output=True, text=True, check=True)
        return [int(kb) / 1e3 for kb in done.stdout.split()[-2:]]

    assert max(growth_mb("bounded")) < file_mb / 4
    assert min(growth_mb("plain")) > file_mb / 2  # the check above can fail: plain map writes and reads grow RSS


def test_data_ram_budget_defaults_to_half_the_available_ram(monkeypatch):
    from medclf.data import chunks

    monkeypatch.delenv(RAM_ENV, raising=False)
    monkeypatch.setattr(chunks, "available_ram", lambda: 10 << 30)
    assert data_ram_budget() == 5 << 30
    monkeypatch.setenv(RAM_ENV, "1.5")
    assert data_ram_budget() == 3 << 29


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_bad_data_ram_budget_is_one_line_and_exit_2(value, tmp_path, monkeypatch, capsys):
    data = make_split_folder(tmp_path / "xray")
    monkeypatch.setenv(RAM_ENV, value)
    assert main(["train", str(data), "--no-plan", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"medclf: error: {RAM_ENV}={value!r}: expected the RAM for decoded images in GiB, "
                   "a number >= 0 (e.g. 4 or 0.5)")
