"""Bad data answered in one line: decompression bombs, malformed .npz files, too few classes."""
import io
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from medclf.cli import main
from medclf.data import sources
from medclf.data.store import build_store, native_size, probe_channels
from medclf.errors import MedclfError

from conftest import FAST_FLAGS, make_image, make_split_folder, write_class_folders


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header claims width × height pixels (IHDR patched, CRC recomputed)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), width, height, ...
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 8 + 13]))
    data[ihdr + 8 + 13:ihdr + 8 + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("medclf: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- decompression bombs ---------------------------------------------------------------------------

@pytest.mark.parametrize("side", [50_000, 10_000])  # above 2× PIL's limit (its error), and above it (its warning)
def test_decompression_bomb_is_an_unreadable_image(tmp_path, side):
    root = write_class_folders(tmp_path / "d", {"a": 3, "b": 3})
    bomb = bomb_png(root / "a" / "bomb.png", side, side)
    assert struct.unpack(">II", bomb.read_bytes()[16:24]) == (side, side)
    source = sources.open_source(root)
    with pytest.raises(MedclfError, match=r"cannot read image .*bomb.png: .*pixels"):
        build_store(source, "train", 16, 1, cache=False)


def test_skip_bad_skips_a_bomb(split_folder):
    bomb = bomb_png(split_folder / "train" / "NORMAL" / "bomb.png", 10_000, 10_000)
    source = sources.open_source(split_folder)
    with pytest.raises(MedclfError, match="cannot read image .*bomb.png"):
        build_store(source, "train", 12, 1, cache=False)
    store, skipped = build_store(source, "train", 12, 1, skip_bad=True, cache=False)
    assert skipped == [str(bomb)] and len(store) == 48


def test_bomb_in_train_and_predict_is_one_line_or_skipped(split_folder, tmp_path, capsys):
    bomb_png(split_folder / "train" / "NORMAL" / "bomb.png", 50_000, 50_000)
    run = tmp_path / "run"
    assert main(["train", str(split_folder), *FAST_FLAGS, "--out", str(run)]) == 2
    assert "bomb.png" in one_line_error(capsys)
    assert main(["train", str(split_folder), *FAST_FLAGS, "--skip-bad", "--out", str(run)]) == 0
    assert "bomb.png" in (run / "skipped.txt").read_text()
    inputs = split_folder / "train" / "NORMAL"
    capsys.readouterr()
    assert main(["predict", str(run), str(inputs), "--out", str(tmp_path / "p.csv")]) == 2
    assert "bomb.png" in one_line_error(capsys)
    assert main(["predict", str(run), str(inputs), "--skip-bad", "--out", str(tmp_path / "p.csv")]) == 0
    assert "bomb.png" not in (tmp_path / "p.csv").read_text()


# --- .npz contents: one table, each row a full `medclf train` -----------------------------------------

def _images(n: int, dtype=np.uint8, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([make_image(i % 2, size, rng) for i in range(n)]).astype(dtype)


def _labels(n: int) -> np.ndarray:
    return (np.arange(n) % 2).reshape(-1, 1)


def _npz(path: Path, **arrays) -> Path:
    base = {"train_images": _images(20), "train_labels": _labels(20), "val_images": _images(6), "val_labels": _labels(6)}
    np.savez(path, **{**base, **arrays})
    return path


def _with_nan(images: np.ndarray, row: int, value=np.nan) -> np.ndarray:
    images = images.astype(np.float32) / 255
    images[row, 1, 1] = value
    return images


BAD_NPZ = {
    "empty split": ({"val_images": np.zeros((0, 8, 8), np.uint8), "val_labels": np.zeros((0, 1))},
                    "val_images has no rows"),
    "string labels": ({"train_labels": np.array(["a", "b"] * 10)}, "train_labels must hold integer class indices"),
    "pickled objects": ({"train_labels": np.array([0, 1] * 10, dtype=object)}, "train_labels holds Python objects"),
    "one class": ({"train_labels": np.zeros(20, int), "val_labels": np.zeros(6, int)},
                  "one class only .*at least two classes"),
    "fractional labels": ({"train_labels": np.array([0.0, 0.7] * 10)}, "train_labels row 1 is 0.7"),
    "val class train lacks": ({"val_labels": np.array([0, 1, 2, 0, 1, 2])}, "val_labels have class\\(es\\) 2 that train lacks"),
    "label gaps": ({"train_labels": np.array([0, 5] * 10), "val_labels": np.array([0, 5] * 3)},
                   "skip class\\(es\\) 1, 2, 3, 4 .*remap labels to 0..K-1"),
    "NaN image": ({"train_images": _with_nan(_images(20), 7)}, "train_images row 7 holds NaN or infinity"),
    "inf image": ({"val_images": _with_nan(_images(6), 2, np.inf), "train_images": _images(20) / 255},
                  "val_images row 2 holds NaN or infinity"),
    "float out of range": ({"train_images": _images(20).astype(np.float32) * 4}, "scale them to \\[0, 1\\] or \\[0, 255\\]"),
    "int out of range": ({"train_images": _images(20).astype(np.int32) * 300}, "integer images must lie in 0..255"),
    "bool images": ({"train_images": _images(20) > 100}, "dtype bool; use uint8, uint16 or float"),
    "empty images": ({"train_images": np.zeros((20, 0, 8), np.uint8)}, "empty images"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_one_line(tmp_path, capsys, case):
    arrays, message = BAD_NPZ[case]
    path = _npz(tmp_path / "bad.npz", **arrays)
    assert main(["train", str(path), *FAST_FLAGS, "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert re.search(message, err), err
    assert str(path) in err


def test_float_images_train_and_report(tmp_path, capsys):
    path = _npz(tmp_path / "f.npz", train_images=_images(20) / 255.0, val_images=_images(6) / 255.0)
    assert main(["train", str(path), *FAST_FLAGS, "--out", str(tmp_path / "run")]) == 0
    assert "images converted to uint8 ([0, 1] × 255)" in capsys.readouterr().err
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.parametrize("dtype,scale,expected", [
    (np.float32, 1 / 255, lambda a: a),  # [0, 1] floats: × 255
    (np.float64, 1.0, lambda a: a),  # [0, 255] floats: rounded
    (np.int64, 1, lambda a: a),  # small integers: as they are
    (np.uint16, 300, None),  # 16-bit: each image stretched to 0..255
])
def test_npz_pixel_conversions(tmp_path, dtype, scale, expected):
    raw = _images(20)
    path = _npz(tmp_path / "c.npz", train_images=(raw.astype(float) * scale).astype(dtype),
                val_images=(_images(6).astype(float) * scale).astype(dtype))
    source = sources.open_source(path)
    got = np.asarray(build_store(source, "train", 8, 1, cache=False)[0].images)[:, 0]
    if expected is None:
        lo = raw.reshape(20, -1).min(1)[:, None, None].astype(float)
        hi = raw.reshape(20, -1).max(1)[:, None, None].astype(float)
        want = np.round((raw - lo) * 255 / (hi - lo))
        assert np.abs(got.astype(int) - want).max() <= 1
    else:
        assert np.array_equal(got, expected(raw))


def test_model_classes_may_cover_more_than_the_data(tmp_path):
    path = _npz(tmp_path / "sub.npz", train_labels=np.zeros(20, int))
    with pytest.raises(MedclfError, match="one class only"):
        sources.open_source(path)
    source = sources.open_source(path, classes=["0", "1", "2"])  # evaluating a three-class model is fine
    assert source.classes == ["0", "1", "2"] and set(source.splits["train"].labels) == {0}


def test_single_class_folder_refused_for_training(tmp_path, capsys):
    root = write_class_folders(tmp_path / "one", {"only": 12})
    assert main(["train", str(root), *FAST_FLAGS, "--out", str(tmp_path / "run")]) == 2
    assert "at least two classes" in one_line_error(capsys)
    split_root = make_split_folder(tmp_path / "xray")
    shutil.rmtree(split_root / "train" / "PNEUMONIA")
    with pytest.raises(MedclfError, match="one class only \\(NORMAL\\)"):
        sources.open_source(split_root)


def test_too_few_images_to_carve_validation(tmp_path):
    path = tmp_path / "one.npz"
    np.savez(path, train_images=_images(1), train_labels=np.array([0]))
    source = sources.open_source(path, classes=["a", "b"])  # `evaluate --split val` of a model on it
    with pytest.raises(MedclfError, match="1 image\\(s\\) are too few to hold out 10%"):
        sources.ensure_val_split(source, 0.1, seed=0)


# --- property: any .npz opens and stores, or fails with our one-line error ----------------------------

DTYPES = ["uint8", "uint16", "int64", "float32", "float64", "bool", "<U1", "object"]


@st.composite
def npz_contents(draw):
    """Mostly well-formed splits (so the success path is explored too), with every kind of fault mixed in."""
    arrays = {}

    def rare() -> bool:  # one fault in ten
        return draw(st.integers(0, 9)) == 9

    side = 0 if rare() else draw(st.integers(1, 5))
    for split in draw(st.lists(st.sampled_from(["train", "val", "test"]), min_size=1, max_size=3, unique=True)):
        n = 0 if rare() else draw(st.integers(2, 8))
        shape = (n, side, 0 if rare() else side)
        if draw(st.booleans()):
            shape += (draw(st.sampled_from([1, 3, 3, 2])),)
        dtype = draw(st.sampled_from(DTYPES[:4])) if not rare() else draw(st.sampled_from(DTYPES))
        values = draw(st.sampled_from([255, 1])) if not rare() else draw(st.sampled_from([300, 0.5, float("nan"), -1]))
        rng = np.random.default_rng(draw(st.integers(0, 9)))
        with np.errstate(invalid="ignore"):  # NaN cast to integers: whatever it becomes is fair input
            images = (rng.random(shape) * values).astype(dtype) if dtype != "object" else np.empty(shape, object)
        if not rare():
            label_values = list(np.arange(n) % draw(st.integers(2, 3)) if not rare() else np.zeros(n))
        else:
            label_n = n if draw(st.booleans()) else draw(st.integers(0, 9))
            label_values = draw(st.lists(st.sampled_from([0, 1, 2, 5, -1, 0.5, 1.0, 10**12]), min_size=label_n,
                                         max_size=label_n))
        label_dtype = draw(st.sampled_from(["int64", "float64", "uint8"])) if not rare() else "<U3"
        labels = np.array(label_values, dtype=float)
        with np.errstate(invalid="ignore"):  # 10**12 wraps in uint8: also fair input
            labels = labels.astype(label_dtype) if label_dtype != "uint8" else np.abs(labels).astype(np.uint8)
        if draw(st.booleans()):
            labels = labels.reshape(-1, 1)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=npz_contents(), with_model_classes=st.booleans())
def test_any_npz_opens_or_fails_in_one_line(tmp_path, contents, with_model_classes):
    path = tmp_path / "random.npz"
    np.savez(path, **contents)
    try:
        source = sources.open_source(path, classes=["a", "b", "c"] if with_model_classes else None)
        sources.ensure_val_split(source, 0.2, seed=0)
        for name, split in source.splits.items():
            store, _ = build_store(source, name, native_size(source), probe_channels(source, split),
                                  cache_dir=str(tmp_path / "cache"))
            assert len(store) == len(split) and store.labels.tolist() == split.labels.tolist()
        event("opened and stored")
    except MedclfError as exc:
        assert "\n" not in str(exc) and str(exc).strip()
        event("refused")
