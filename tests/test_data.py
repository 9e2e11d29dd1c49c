import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medclf.data import sources, splits
from medclf.data.store import build_store, decode_image, native_size, probe_channels
from medclf.errors import MedclfError

from conftest import write_class_folders


def test_split_folder_layout(split_folder):
    source = sources.open_source(split_folder)
    assert source.classes == ["NORMAL", "PNEUMONIA"]
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 48, "val": 16, "test": 16}
    assert not source.generated_splits


def test_class_folders_get_a_reproducible_stratified_split(tmp_path):
    root = write_class_folders(tmp_path / "d", {"a": 30, "b": 20}, size=12)
    one = sources.open_source(root, seed=3)
    two = sources.open_source(root, seed=3)
    assert {s: len(v) for s, v in one.splits.items()} == {"train": 40, "val": 5, "test": 5}
    assert one.splits["val"].paths == two.splits["val"].paths
    assert np.bincount(one.splits["test"].labels).tolist() == [3, 2]
    all_paths = sum((v.paths for v in one.splits.values()), [])
    assert len(set(all_paths)) == 50  # no image in two splits


def test_stratified_split_fractions():
    labels = np.array([0] * 80 + [1] * 20)
    parts = splits.stratified_split(labels, 0.1, 0.1, seed=0)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100))
    assert np.bincount(labels[parts["val"]]).tolist() == [8, 2]


def test_npz_without_test_split_and_carved_val(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, train_images=np.zeros((20, 8, 8), np.uint8), train_labels=(np.arange(20) % 2).reshape(-1, 1))
    source = sources.open_source(path)
    assert list(source.splits) == ["train"] and source.classes == ["0", "1"]
    sources.ensure_val_split(source, 0.2, seed=0)
    assert len(source.splits["val"]) == 4 and len(source.splits["train"]) == 16


def test_npz_store_keeps_native_size_and_one_channel(npz_file):
    source = sources.open_source(npz_file)
    store, skipped = build_store(source, "train", native_size(source), probe_channels(source, source.splits["train"]))
    assert store.images.shape == (60, 1, 16, 16) and store.images.dtype == torch.uint8
    assert store.labels.tolist()[:4] == [0, 1, 2, 0] and skipped == []


def test_npz_rgb_and_resize(tmp_path):
    path = tmp_path / "rgb.npz"
    np.savez(path, train_images=np.full((4, 10, 10, 3), 200, np.uint8), train_labels=np.array([[0], [1], [0], [1]]))
    source = sources.open_source(path)
    assert probe_channels(source, source.splits["train"]) == 3
    store, _ = build_store(source, "train", 20, 3, cache=False)
    assert store.images.shape == (4, 3, 20, 20) and int(store.images[0, 0, 5, 5]) == 200


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "P"])
def test_image_modes_load(tmp_path, mode):
    array = (np.arange(16 * 16).reshape(16, 16) % 251).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(array.astype(np.uint16) * 200)
    else:
        img = Image.fromarray(array, "L").convert(mode)
    path = tmp_path / f"x_{mode.replace(';', '')}.png"
    img.save(path)
    out = decode_image(str(path), 8)
    assert out.dtype == np.uint8 and out.shape == (8, 8)  # gray content stays one channel
    assert out.max() > 100


def test_colour_jpeg_is_three_channels_and_resized(tmp_path):
    array = np.zeros((40, 60, 3), np.uint8)
    array[..., 0] = 255
    Image.fromarray(array).save(tmp_path / "c.jpeg", quality=95)
    out = decode_image(str(tmp_path / "c.jpeg"), 20)
    assert out.shape == (20, 20, 3) and out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_mixed_gray_and_rgb_files_probe_as_gray(tmp_path):
    root = write_class_folders(tmp_path / "d" / "train", {"a": 3, "b": 3}, size=12, mode="RGB")
    source = sources.open_source(tmp_path / "d")
    assert probe_channels(source, source.splits["train"]) == 1
    assert root.exists()


def test_cache_hit_returns_same_store(split_folder, tmp_path):
    source = sources.open_source(split_folder)
    first, _ = build_store(source, "train", 12, 1, cache_dir=str(tmp_path / "c"))
    assert len(list((tmp_path / "c").iterdir())) == 1
    second, _ = build_store(source, "train", 12, 1, cache_dir=str(tmp_path / "c"))
    assert torch.equal(torch.as_tensor(np.asarray(first.images)), torch.as_tensor(np.asarray(second.images)))
    assert second.ids == first.ids
    third, _ = build_store(source, "train", 10, 1, cache_dir=str(tmp_path / "c"))  # other preprocessing: new entry
    assert third.size == 10 and len(list((tmp_path / "c").iterdir())) == 2


def test_memmapped_store_take_matches_in_memory(split_folder):
    source = sources.open_source(split_folder)
    store, _ = build_store(source, "train", 12, 1, cache=False)
    mm = type(store)(store.images.numpy(), store.labels, store.ids)
    idx = torch.tensor([5, 1, 30, 2])
    assert torch.equal(store.take(idx), mm.take(idx))


# --- bad input: one clear error -------------------------------------------------------------

def test_missing_path():
    with pytest.raises(MedclfError, match="data not found: /nope"):
        sources.open_source("/nope/data")


def test_empty_class_folder(split_folder):
    (split_folder / "train" / "EMPTY").mkdir()
    with pytest.raises(MedclfError, match="class folder has no images: .*EMPTY"):
        sources.open_source(split_folder)


def test_val_class_missing_from_train(split_folder):
    write_class_folders(split_folder / "val", {"COVID": 2}, size=12)
    with pytest.raises(MedclfError, match="class\\(es\\) COVID that train lacks"):
        sources.open_source(split_folder)


def test_corrupt_image_named_and_skippable(split_folder):
    bad = split_folder / "train" / "NORMAL" / "broken.png"
    bad.write_bytes(b"not an image")
    source = sources.open_source(split_folder)
    with pytest.raises(MedclfError, match="cannot read image .*broken.png"):
        build_store(source, "train", 12, 1, cache=False)
    store, skipped = build_store(source, "train", 12, 1, skip_bad=True, cache=False)
    assert skipped == [str(bad)] and len(store) == 48 and str(bad) not in store.ids


def test_npz_without_expected_keys(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(MedclfError, match="no <split>_images arrays .*found keys: x"):
        sources.open_source(path)


def test_npz_labels_out_of_range_for_model_classes(npz_file):
    with pytest.raises(MedclfError, match="labels out of range"):
        sources.open_source(npz_file, classes=["a", "b"])


def test_npz_negative_labels(tmp_path):
    path = tmp_path / "neg.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([[0], [-1]]))
    with pytest.raises(MedclfError, match="out of range"):
        sources.open_source(path)


def test_split_file_written(tmp_path):
    path = tmp_path / "splits.csv"
    splits.write_split_file(path, {"train": ["a.png", "b.png"]}, {"train": np.array([0, 1])}, ["x", "y"],
                            {"train": ["p1", "p2"]})
    rows = list(csv.DictReader(open(path)))
    assert rows == [{"split": "train", "id": "a.png", "label": "x", "group": "p1"},
                    {"split": "train", "id": "b.png", "label": "y", "group": "p2"}]


def test_failed_decode_leaves_no_partial_cache_and_skip_bad_caches(split_folder, tmp_path):
    (split_folder / "train" / "NORMAL" / "broken.png").write_bytes(b"junk")
    source = sources.open_source(split_folder)
    cache = tmp_path / "c"
    with pytest.raises(MedclfError):
        build_store(source, "train", 12, 1, cache_dir=str(cache))
    assert list(cache.iterdir()) == []  # the temporary folder was removed
    store, skipped = build_store(source, "train", 12, 1, skip_bad=True, cache_dir=str(cache))
    again, skipped_again = build_store(source, "train", 12, 1, skip_bad=True, cache_dir=str(cache))
    assert len(store) == len(again) == 48 and skipped == skipped_again and len(skipped) == 1


def test_listed_images_are_strings_in_path_component_order(tmp_path):
    """`list_images` sorts path strings as Paths sort (by component): "a/x" before "a-b/x", which plain string
    order puts after it ("-" < "/"); the order decides seeded splits, so it must not change."""
    for rel in ("a-b/x.png", "a/x.png", "a/b/y.png", "a.b/z.png", "A/w.png", ".hidden.png", "a/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = sources.list_images(tmp_path)
    assert all(isinstance(p, str) for p in found)
    assert found == [str(p) for p in sorted(Path(p) for p in found)]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == [
        "A/w.png", "a/b/y.png", "a/x.png", "a-b/x.png", "a.b/z.png"]
