"""The decoded-store cache: what a hit may serve, full disks, orphaned temporary stores, `medclf cache`."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medclf.cli import main
from medclf.data import cache, sources, store
from medclf.data.store import build_store
from medclf.errors import MedclfError

from conftest import make_image, write_class_folders

REPO = Path(__file__).resolve().parents[1]


def _pixels(s) -> np.ndarray:
    return np.asarray(s.images)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(store, "_warned_roots", set())


def test_cache_hit_takes_labels_from_the_current_class_list(tmp_path):
    root = write_class_folders(tmp_path / "d" / "test", {"A": 2, "C": 2})
    cache_dir = str(tmp_path / "c")
    two = sources.open_source(tmp_path / "d", classes=["A", "C"])
    build_store(two, "test", 12, 1, cache_dir=cache_dir)
    three = sources.open_source(tmp_path / "d", classes=["A", "B", "C"])  # a model trained on three classes
    hit, _ = build_store(three, "test", 12, 1, cache_dir=cache_dir)
    assert three.splits["test"].labels.tolist() == [0, 0, 2, 2]
    assert hit.labels.tolist() == [0, 0, 2, 2]
    assert len(list(Path(cache_dir).iterdir())) == 1 and root.exists()  # the pixels were reused


def test_same_size_and_mtime_but_new_bytes_is_not_served_stale(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):  # BMP: every 12×12 gray image has the same byte size, as a restored backup would
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(make_image(i % 2, 12, rng)).save(tmp_path / "d" / "train" / c / f"{i}.bmp")
    source = sources.open_source(tmp_path / "d")
    cache_dir = str(tmp_path / "c")
    first, _ = build_store(source, "train", 12, 1, cache_dir=cache_dir)
    target = tmp_path / "d" / "train" / "a" / "0.bmp"
    st = target.stat()
    Image.fromarray(255 - make_image(0, 12, rng)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # what `cp -p` from a backup does
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    second, _ = build_store(source, "train", 12, 1, cache_dir=cache_dir)
    row = second.ids.index(str(target))
    assert not np.array_equal(_pixels(first)[row], _pixels(second)[row])
    fresh, _ = build_store(source, "train", 12, 1, cache=False)
    assert np.array_equal(_pixels(fresh), _pixels(second))


def test_skip_bad_does_not_leak_through_the_cache(split_folder, tmp_path):
    bad = split_folder / "train" / "NORMAL" / "broken.png"
    bad.write_bytes(b"junk")
    source = sources.open_source(split_folder)
    cache_dir = str(tmp_path / "c")
    store_, skipped = build_store(source, "train", 12, 1, skip_bad=True, cache_dir=cache_dir)
    assert skipped == [str(bad)] and len(store_) == 48
    with pytest.raises(MedclfError, match="cannot read image .*broken.png"):
        build_store(source, "train", 12, 1, cache_dir=cache_dir)  # as a cold cache answers
    again, skipped_again = build_store(source, "train", 12, 1, skip_bad=True, cache_dir=cache_dir)
    assert skipped_again == skipped and again.ids == store_.ids
    assert again.labels.tolist() == store_.labels.tolist()


def test_skip_bad_leak_through_cli(split_folder, tmp_path, capsys):
    (split_folder / "train" / "NORMAL" / "broken.png").write_bytes(b"junk")
    flags = ["--epochs", "1", "--batch-size", "16", "--patience", "0", "--no-plan", "--cache-dir", str(tmp_path / "c")]
    assert main(["train", str(split_folder), *flags, "--skip-bad", "--out", str(tmp_path / "r1")]) == 0
    capsys.readouterr()
    assert main(["train", str(split_folder), *flags, "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("medclf: error: cannot read image") and "broken.png" in err


def test_damaged_cache_entry_is_rebuilt(split_folder, tmp_path):
    source = sources.open_source(split_folder)
    cache_dir = tmp_path / "c"
    first, _ = build_store(source, "val", 12, 1, cache_dir=str(cache_dir))
    (entry,) = cache_dir.iterdir()
    (entry / "images.npy").write_bytes(b"truncated")
    again, _ = build_store(source, "val", 12, 1, cache_dir=str(cache_dir))
    assert np.array_equal(_pixels(first), _pixels(again))


# --- full disk -----------------------------------------------------------------------------------

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_when_reserving_falls_back_to_memory_with_one_warning(split_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "posix_fallocate", _no_space)
    source = sources.open_source(split_folder)
    cache_dir = tmp_path / "c"
    stores = {s: build_store(source, s, 12, 1, cache_dir=str(cache_dir))[0] for s in source.splits}
    err = capsys.readouterr().err
    assert err.count("medclf: warning: cannot write the decoded-image cache") == 1 and "No space left" in err
    assert [len(s) for s in stores.values()] == [48, 16, 16]
    assert list(cache_dir.iterdir()) == []  # no orphaned temporary store keeps the disk full
    monkeypatch.undo()
    cached, _ = build_store(source, "train", 12, 1, cache_dir=str(cache_dir))  # the next plain run caches
    assert np.array_equal(_pixels(cached), _pixels(stores["train"])) and len(list(cache_dir.iterdir())) == 1


def test_full_disk_when_finishing_the_store_falls_back_to_memory(npz_file, tmp_path, monkeypatch, capsys):
    def full_save(path, *args, **kwargs):
        Path(path).write_bytes(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_save)
    source = sources.open_source(npz_file)
    cache_dir = tmp_path / "c"
    got, _ = build_store(source, "train", 16, 1, cache_dir=str(cache_dir))
    assert len(got) == 60 and got.labels.tolist()[:3] == [0, 1, 2]
    assert "cannot write the decoded-image cache" in capsys.readouterr().err
    assert list(cache_dir.iterdir()) == []
    monkeypatch.undo()
    again, _ = build_store(source, "train", 16, 1, cache_dir=str(cache_dir))
    assert np.array_equal(_pixels(got), _pixels(again)) and len(list(cache_dir.iterdir())) == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MB tmpfs, where this test may mount one (root on Linux); skipped elsewhere."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root on Linux")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_tmpfs_cache_trains_instead_of_dying(split_folder, small_tmpfs):
    # in a child process: the old failure mode is SIGBUS, which would take pytest down with it
    script = textwrap.dedent(f"""
        from medclf.data import sources
        from medclf.data.store import build_store
        source = sources.open_source({str(split_folder)!r})
        for attempt in range(2):
            store, _ = build_store(source, "train", 256, 1, cache_dir={str(small_tmpfs)!r})
            assert len(store) == 48 and store.images.shape[-1] == 256
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok" and done.stderr.count("cannot write the decoded-image cache") == 1
    assert not [p for p in small_tmpfs.iterdir() if p.name.startswith(".tmp-")]


# --- orphaned temporary stores and `medclf cache` -------------------------------------------------

def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def _tmp_store(root: Path, name: str, age_seconds: float = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "images.npy").write_bytes(bytes(1000))
    then = time.time() - age_seconds
    for p in (folder / "images.npy", folder):
        os.utime(p, (then, then))
    return folder


def test_orphaned_temporary_stores_are_cleaned_up(split_folder, tmp_path):
    root = tmp_path / "c"
    host = socket.gethostname()
    dead = _tmp_store(root, f".tmp-{_dead_pid()}@{host}.abc")
    old = _tmp_store(root, ".tmp-oldstyle", age_seconds=cache.STALE_TMP_SECONDS + 60)
    live = _tmp_store(root, f".tmp-{os.getpid()}@{host}.def")  # a run still decoding
    elsewhere = _tmp_store(root, f".tmp-{_dead_pid()}@other-{uuid.uuid4().hex}.ghi")  # its pid means nothing here
    build_store(sources.open_source(split_folder), "val", 12, 1, cache_dir=str(root))
    assert not dead.exists() and not old.exists()
    assert live.exists() and elsewhere.exists()


def _two_stores(split_folder, root: Path) -> tuple[Path, Path]:
    source = sources.open_source(split_folder)
    build_store(source, "val", 12, 1, cache_dir=str(root))
    build_store(source, "test", 12, 1, cache_dir=str(root))
    stores = {json.loads((p / "meta.json").read_text())["split"]: p for p in root.iterdir()}
    return stores["val"], stores["test"]


def test_cache_list_prune_clear(split_folder, tmp_path, capsys):
    root = tmp_path / "c"
    val, test = _two_stores(split_folder, root)
    os.utime(val / "meta.json", (time.time() - 3600, time.time() - 3600))  # val: least recently used
    orphan = _tmp_store(root, f".tmp-{_dead_pid()}@{socket.gethostname()}.x")
    assert main(["cache", "list", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert val.name in out and test.name in out and "2 store(s)" in out and "[val]" in out
    one_store = cache.entries(root)[-1].nbytes
    assert main(["cache", "prune", "--max-size", str(one_store / 1e9), "--cache-dir", str(root)]) == 0
    assert "removed 1 store(s)" in capsys.readouterr().out
    assert not val.exists() and test.exists() and not orphan.exists()
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert not test.exists() and cache.total_bytes(root) == 0


def test_cache_hit_counts_as_use_for_pruning(split_folder, tmp_path):
    root = tmp_path / "c"
    val, test = _two_stores(split_folder, root)
    past = time.time() - 3600
    os.utime(test / "meta.json", (past, past))
    os.utime(val / "meta.json", (past - 60, past - 60))
    build_store(sources.open_source(split_folder), "val", 12, 1, cache_dir=str(root))  # a hit: val is now newest
    cache.prune(root, cache.entries(root)[-1].nbytes)
    assert val.exists() and not test.exists()


def test_cache_prune_needs_max_size(capsys):
    assert main(["cache", "prune"]) == 2
    assert capsys.readouterr().err.strip() == ("medclf: error: cache prune needs --max-size GB (a finite number, 0 or "
                                               "more): the size to evict down to")
    assert main(["cache", "prune", "--max-size", "nan"]) == 2
    assert "--max-size GB (a finite number" in capsys.readouterr().err


def test_cache_clear_never_deletes_folders_it_did_not_make(split_folder, tmp_path):
    """--cache-dir may point at a folder of the user's: clear/prune remove medclf's stores only."""
    root = tmp_path / "c"
    val, test = _two_stores(split_folder, root)
    (root / "Documents").mkdir()
    (root / "Documents" / "thesis.txt").write_text("mine")
    lookalike = root / ("0" * 20)  # named like a store but holding a user's file
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("mine too")
    (root / ".tmp-notes").mkdir()
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert not val.exists() and not test.exists()
    assert (root / "Documents" / "thesis.txt").read_text() == "mine"
    assert (lookalike / "notes.txt").read_text() == "mine too" and (root / ".tmp-notes").is_dir()


def test_datasets_shows_the_cache_size(split_folder, capsys):
    build_store(sources.open_source(split_folder), "val", 12, 1)  # default cache: $MEDCLF_DATA/stores
    assert main(["datasets"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("decoded stores:"))
    size = cache.total_bytes(cache.cache_root(None))
    assert size > 0 and cache.human_bytes(size) in line


def test_reserved_npy_reads_back_as_npy(tmp_path):
    mm = cache.reserved_npy(tmp_path / "x.npy", (3, 1, 4, 4))
    mm[:] = np.arange(48, dtype=np.uint8).reshape(3, 1, 4, 4)
    mm.flush()
    assert os.stat(tmp_path / "x.npy").st_blocks * 512 >= 48  # allocated, not sparse
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "x.npy")), torch.arange(48, dtype=torch.uint8).view(3, 1, 4, 4))


def test_reserved_npy_writes_zeros_where_fallocate_is_unsupported(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    mm = cache.reserved_npy(tmp_path / "x.npy", (2, 1, 8, 8))
    mm[1] = 7
    mm.flush()
    assert os.stat(tmp_path / "x.npy").st_blocks * 512 >= 128
    assert np.load(tmp_path / "x.npy").sum() == 7 * 64


def _with_duplicates(split_folder: Path) -> Path:
    """The split folder with one train image copied into val (an exact cross-split duplicate) and one corrupt file."""
    first = sorted((split_folder / "train" / "NORMAL").iterdir())[0]
    shutil.copy(first, split_folder / "val" / "NORMAL" / "copied.png")
    (split_folder / "test" / "PNEUMONIA" / "broken.png").write_bytes(b"not a png")
    return split_folder


def test_worker_processes_decode_the_same_pixels_and_digests_as_threads(split_folder, tmp_path, monkeypatch):
    """Large splits decode in forked processes: the pixels, the skipped files and the files' SHA-256 match the
    thread decode; a bad file without --skip-bad is the same one-line error."""
    import hashlib

    source = sources.open_source(_with_duplicates(split_folder))
    monkeypatch.setattr(store, "PROCESS_MIN_IMAGES", 10**9)
    threads, skipped = build_store(source, "test", 12, 1, skip_bad=True, cache=False)
    monkeypatch.setattr(store, "PROCESS_MIN_IMAGES", 1)
    assert isinstance(store._decode_pool(40), store.ProcessPoolExecutor) == sys.platform.startswith("linux")
    processes, skipped_too = build_store(source, "test", 12, 1, skip_bad=True, cache=False)
    assert skipped == skipped_too and len(skipped) == 1 and skipped[0].endswith("broken.png")
    assert np.array_equal(_pixels(threads), _pixels(processes)) and threads.ids == processes.ids
    paths = source.splits["test"].paths
    assert np.array_equal(threads.digests, processes.digests) and processes.digests.shape == (len(paths), 32)
    assert [d.tobytes() for d in processes.digests] == [hashlib.sha256(Path(p).read_bytes()).digest() for p in paths]
    with pytest.raises(MedclfError, match="broken.png"):
        build_store(source, "test", 12, 1, cache=False)
    cached, _ = build_store(source, "test", 12, 1, skip_bad=True, cache_dir=str(tmp_path / "c"))
    again, _ = build_store(source, "test", 12, 1, skip_bad=True, cache_dir=str(tmp_path / "c"))  # a cache hit
    assert np.array_equal(cached.digests, processes.digests) and np.array_equal(again.digests, processes.digests)


def test_the_training_duplicate_check_uses_the_decode_digests_and_reads_no_file_again(split_folder, monkeypatch):
    import importlib

    from medclf import training

    doctor_module = importlib.import_module("medclf.doctor")  # the module: medclf.doctor is also the function

    source = sources.open_source(_with_duplicates(split_folder))
    stores = {name: build_store(source, name, 12, 1, skip_bad=True, cache=False)[0] for name in source.splits}
    expected = doctor_module.brief(source)  # reads and hashes every file
    hashes = doctor_module.store_hashes(source, stores)
    assert hashes == doctor_module.read_files(source, progress=False, headers=False)[0]
    monkeypatch.setattr(doctor_module, "read_files", lambda *a, **k: pytest.fail("a file was read again"))
    checked = training.brief_doctor(source, str(split_folder), progress=False, stores=stores)
    assert checked == expected and len(checked["cross_split_duplicates"]) == 1
    without = dict(stores, val=store.Store(stores["val"].images, stores["val"].labels, stores["val"].ids))
    assert doctor_module.store_hashes(source, without) is None  # a store without digests: the files are read


def test_ctrl_c_during_a_process_decode_stops_it_promptly_and_leaves_no_store(split_folder, tmp_path):
    """SIGINT to medclf while worker processes decode: the queued work is dropped (it does not decode the rest of
    the split first), the workers go, and no temporary store is left in the cache."""
    script = textwrap.dedent(f"""
        import time, numpy as np
        from medclf.data import sources, store
        store.PROCESS_MIN_IMAGES = 1
        real = store.decode_image
        def slow(path, size):  # inherited by the forked workers
            time.sleep(0.05)
            return real(path, size)
        store.decode_image = slow
        source = sources.open_source({str(split_folder)!r})
        source.splits["train"].paths *= 40  # 1,920 images: about a minute of decoding
        source.splits["train"].labels = np.tile(source.splits["train"].labels, 40)
        print("decoding", flush=True)
        store.build_store(source, "train", 12, 1, cache_dir={str(tmp_path / "c")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "decoding"
    time.sleep(2)
    started = time.monotonic()
    proc.send_signal(2)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 10, "the rest of the split was decoded before Ctrl-C was answered"
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(cache.TMP_PREFIX)]
    assert not (tmp_path / "c").exists() or not any(cache.is_store_folder(p) for p in (tmp_path / "c").iterdir())
