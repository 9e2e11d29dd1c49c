"""`medclf doctor`: duplicates and patients across splits, label conflicts, unreadable and odd images, --strict,
the page in a browser, and the brief check `train` runs first."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medclf
from medclf.cli import main
from medclf.doctor import Images, dicom_header, header_outliers, image_header, warn

from conftest import FAST_FLAGS, SHARED, make_image, make_split_folder, write_class_folders
from htmlcheck import assert_self_contained, check_numbers, injected, needs_chromium, parse, render

PNEUMONIAMNIST = SHARED / "pneumoniamnist_28_trainval.npz"


def _jpeg(path: Path, label: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_image(label, 32, np.random.default_rng(seed))).save(path, quality=95)


def make_leaky_folder(root: Path) -> Path:
    """Kermany-named chest X-rays in train/val/test with one image copied from train into test (under another
    patient's name) and one patient, person3, with images in train and test."""
    seed = 0
    for split, first in (("train", 1), ("val", 101), ("test", 201)):
        for k in range(first, first + (6 if split == "train" else 3)):
            seed += 1
            _jpeg(root / split / "NORMAL" / f"IM-{k:04d}-0001.jpeg", 0, seed)
            seed += 1
            _jpeg(root / split / "PNEUMONIA" / f"person{k}_bacteria_{k}.jpeg", 1, seed)
    shutil.copy(root / "train/PNEUMONIA/person1_bacteria_1.jpeg", root / "test/PNEUMONIA/person202_virus_9.jpeg")
    _jpeg(root / "test/PNEUMONIA/person3_virus_77.jpeg", 1, 999)
    return root


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """The leaky folder and the doctor's output for it, made through the command line with --strict."""
    base = tmp_path_factory.mktemp("doctor")
    data = make_leaky_folder(base / "xray")
    code = main(["doctor", str(data), "--out", str(base / "out"), "--strict"])
    return data, base / "out", code


def test_planted_duplicate_and_patient_across_splits_are_reported_and_strict_fails(leaky):
    data, out, code = leaky
    assert code == 1  # --strict: findings, distinct from 2 (bad input)
    findings = json.loads((out / "doctor.json").read_text())
    assert findings["cross_split_duplicates"] == [{
        "kind": "exact", "distance": 0,
        "a": {"split": "train", "item": str(data / "train/PNEUMONIA/person1_bacteria_1.jpeg")},
        "b": {"split": "test", "item": str(data / "test/PNEUMONIA/person202_virus_9.jpeg")}}]
    assert findings["group_overlap"] == [{"group": "person3", "splits": ["train", "test"],
                                          "images": {"train": 1, "test": 1}}]
    assert findings["summary"]["leakage"] is True and findings["label_conflicts"] == []
    assert findings["counts"]["train"] == {"NORMAL": 6, "PNEUMONIA": 6}
    assert findings["counts"]["test"] == {"NORMAL": 3, "PNEUMONIA": 5}


def test_strict_passes_on_clean_data_and_without_strict_findings_exit_0(tmp_path, capsys):
    clean = make_split_folder(tmp_path / "clean")
    assert main(["doctor", str(clean), "--out", str(tmp_path / "a"), "--strict"]) == 0
    assert "no cross-split leakage found" in capsys.readouterr().out
    leaky = make_leaky_folder(tmp_path / "leaky")
    assert main(["doctor", str(leaky), "--out", str(tmp_path / "b")]) == 0
    assert "LEAKAGE" in capsys.readouterr().out


def _odd_folder(root: Path) -> dict[str, Path]:
    """Class folders (no Kermany names) with one of each other kind of finding planted."""
    write_class_folders(root / "train", {"a": 8, "b": 8}, size=32, seed=1)
    write_class_folders(root / "val", {"a": 4, "b": 4}, size=32, seed=2)
    planted = {
        "near": root / "val/a/near.png", "conflict": root / "val/b/conflict.png", "broken": root / "val/a/broken.png",
        "blank": root / "val/b/blank.png", "copy": root / "train/a/copy.png", "wide": root / "train/a/wide.png",
        "big": root / "train/b/big.png", "colour": root / "train/a/colour.png", "deep": root / "train/b/deep.png"}
    brighter = np.asarray(Image.open(root / "train/a/a_0.png")).astype(int) + 3
    Image.fromarray(brighter.clip(0, 255).astype(np.uint8)).save(planted["near"])
    shutil.copy(root / "train/a/a_1.png", planted["conflict"])  # the same image labelled a in train, b in val
    shutil.copy(root / "train/a/a_2.png", planted["copy"])
    planted["broken"].write_bytes(b"not an image at all")
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(planted["blank"])
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (32, 96), dtype=np.uint8)).save(planted["wide"])
    Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(planted["big"])
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "RGB").save(planted["colour"])
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(planted["deep"])
    return planted


def test_every_other_finding_on_planted_images(tmp_path):
    planted = _odd_folder(tmp_path / "odd")
    findings = medclf.doctor(tmp_path / "odd", out=tmp_path / "out", progress=False)
    ref = lambda split, key: {"split": split, "item": str(planted[key])}  # noqa: E731
    item = lambda split, name: {"split": split, "item": str(tmp_path / "odd" / split / name)}  # noqa: E731
    near = [d for d in findings["cross_split_duplicates"] if d["kind"] == "near"]
    assert [(d["a"], d["b"]) for d in near] == [(item("train", "a/a_0.png"), ref("val", "near"))]
    exact = [d for d in findings["cross_split_duplicates"] if d["kind"] == "exact"]
    assert [(d["a"], d["b"]) for d in exact] == [(item("train", "a/a_1.png"), ref("val", "conflict"))]
    assert [(d["a"], d["b"], d["kind"]) for d in findings["duplicates"]] == [
        (item("train", "a/a_2.png"), ref("train", "copy"), "exact")]
    assert findings["label_conflicts"] == [{"labels": ["a", "b"], "items": [
        {**item("train", "a/a_1.png"), "label": "a"}, {**ref("val", "conflict"), "label": "b"}]}]
    assert [(u["split"], u["item"]) for u in findings["unreadable"]] == [("val", str(planted["broken"]))]
    assert [(b["split"], b["item"]) for b in findings["nearly_constant"]] == [("val", str(planted["blank"]))]
    flagged = {(Path(o["item"]).name, o["check"]) for o in findings["outliers"]}
    assert flagged == {("wide.png", "aspect"), ("big.png", "size"), ("colour.png", "channels"),
                       ("deep.png", "bit_depth")}
    assert findings["group_overlap"] == [] and findings["groups_known"] is False
    assert (tmp_path / "out" / "doctor.json").is_file() and (tmp_path / "out" / "doctor.html").is_file()


def test_header_outliers_use_the_most_common_mode_and_median_size():
    images = Images(["train"] * 5, [f"f{i}" for i in range(5)], ["a"] * 5, np.arange(5))
    gray = {"width": 100, "height": 100, "channels": 1, "bits": 8, "mode": "L"}
    headers = [gray] * 3 + [{**gray, "bits": 16, "mode": "I;16"}, {**gray, "width": 40}]
    found = {(o["item"], o["check"]) for o in header_outliers(headers, images)}
    # 40×100: aspect 0.4 vs 1 (over 1.5×) and short side 40 vs 100 (over 2×)
    assert found == {("f3", "bit_depth"), ("f4", "aspect"), ("f4", "size")}


def test_dicom_header_gives_size_channels_and_stored_bits(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(np.zeros((20, 30), np.uint16), "MONOCHROME1", 12)
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "x.dcm").BitsStored == 12
    assert dicom_header((tmp_path / "x.dcm").read_bytes()) == {
        "width": 30, "height": 20, "channels": 1, "bits": 12, "mode": "DICOM MONOCHROME1"}
    assert dicom_header(b"not a dicom") is None and image_header(b"not an image") is None


@pytest.mark.skipif(not PNEUMONIAMNIST.is_file(), reason="needs ../shared/datasets")
def test_pneumoniamnist_train_val_share_eight_images(tmp_path):
    archive = np.load(PNEUMONIAMNIST)
    train_rows = {hashlib.md5(r.tobytes()).hexdigest() for r in archive["train_images"]}
    shared_val = [i for i, r in enumerate(archive["val_images"]) if hashlib.md5(r.tobytes()).hexdigest() in train_rows]
    assert len(shared_val) == 8  # the measurement, checked independently of medclf
    findings = medclf.doctor(PNEUMONIAMNIST, out=None, progress=False)
    exact = [d for d in findings["cross_split_duplicates"] if d["kind"] == "exact"]
    assert findings["summary"]["cross_split_exact"] == len(exact) == 8
    assert sorted(int(d["b"]["item"]) for d in exact) == shared_val
    for d in exact:
        assert (d["a"]["split"], d["b"]["split"]) == ("train", "val")
        assert np.array_equal(archive["train_images"][int(d["a"]["item"])], archive["val_images"][int(d["b"]["item"])])
    assert findings["counts"] == {"train": {"0": 1214, "1": 3494}, "val": {"0": 135, "1": 389}}


@pytest.mark.parametrize("argv_tail, message", [
    (["/nowhere/at/all"], "data not found"),
    (["FOLDER", "--out", "FILE"], "is a file"),
])
def test_bad_input_is_one_line_exit_2(argv_tail, message, tmp_path, capsys):
    data = make_split_folder(tmp_path / "xray")
    (tmp_path / "file").write_text("x")
    argv = [str(data) if a == "FOLDER" else str(tmp_path / "file") if a == "FILE" else a for a in argv_tail]
    assert main(["doctor", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medclf: error:") and message in err


def test_page_is_self_contained_and_its_numbers_match_the_json(leaky):
    _, out, _ = leaky
    text = (out / "doctor.html").read_text()
    assert_self_contained(text)
    assert injected(text) == []
    findings = json.loads((out / "doctor.json").read_text())
    assert check_numbers(text, findings) >= 10
    assert len(parse(text).images) == 2  # the two thumbnails of the one cross-split pair
    assert "person3" in text and "person202_virus_9.jpeg" in text


@needs_chromium
def test_page_renders_in_chromium(leaky, tmp_path):
    _, out, _ = leaky
    dom, images = render(out / "doctor.html", tmp_path)
    assert len(images) == 2 and all(complete and w > 0 and h > 0 for complete, w, h in images), images
    assert check_numbers(dom, json.loads((out / "doctor.json").read_text())) >= 10


def test_train_warns_and_records_the_brief_check(tmp_path, capsys):
    data = make_leaky_folder(tmp_path / "xray")
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "person1_bacteria_1.jpeg (train) and " in err and "person202_virus_9.jpeg (test) are the same image" in err
    assert "patient/group person3 has images in train and test" in err
    checked = json.loads((run / "doctor.json").read_text())
    assert len(checked["cross_split_duplicates"]) == 1 and checked["group_overlap"][0]["group"] == "person3"


def test_warnings_are_capped(capsys):
    pair = {"a": {"split": "train", "item": "x"}, "b": {"split": "test", "item": "y"}}
    warn({"cross_split_duplicates": [pair] * 9, "group_overlap": []}, limit=5, data="D")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 6 and lines[-1].endswith("... and 4 more cross-split finding(s); see `medclf doctor D`")


def test_hostile_class_and_file_names_are_text_on_the_page(tmp_path):
    hostile = "<img src=x onerror=alert(1)>"
    write_class_folders(tmp_path / "d" / "train", {hostile: 4, "b": 4}, size=32, seed=1)
    write_class_folders(tmp_path / "d" / "test", {hostile: 2, "b": 2}, size=32, seed=2)
    shutil.copy(tmp_path / f"d/train/{hostile}/{hostile}_0.png", tmp_path / "d/test/b/<script>x.png")
    findings = medclf.doctor(tmp_path / "d", out=tmp_path / "out", progress=False)
    assert len(findings["label_conflicts"]) == 1
    text = (tmp_path / "out" / "doctor.html").read_text()
    assert injected(text) == [] and "&lt;script&gt;x.png" in text and "&lt;img src=x onerror=alert(1)&gt;" in text


def test_multi_label_data_counts_positives_and_compares_label_sets(tmp_path):
    """N×L 0/1 labels (as the multi-label branch gives them): counts are positives per label, and the same image
    with another label set is a conflict."""
    from medclf.data.sources import Source, Split
    from medclf.doctor import examine

    rng = np.random.default_rng(0)
    train = np.stack([make_image(i % 2, 16, rng) for i in range(6)])
    val = np.stack([train[0], make_image(1, 16, rng)])
    np.savez(tmp_path / "ml.npz", train_images=train, val_images=val)
    labels = {"train": np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]]),
              "val": np.array([[1, 1, 0], [0, 0, 1]])}
    source = Source("ml", "npz", tmp_path / "ml.npz", ["x", "y", "z"],
                    {s: Split(labels=v, npz_key=s, rows=np.arange(len(v))) for s, v in labels.items()})
    findings, _, _ = examine(source, progress=False)
    assert findings["counts"] == {"train": {"x": 3, "y": 2, "z": 2}, "val": {"x": 1, "y": 1, "z": 1}}
    assert findings["label_conflicts"] == [{"labels": ["x", "x|y"], "items": [
        {"split": "train", "item": "0", "label": "x"}, {"split": "val", "item": "0", "label": "x|y"}]}]
