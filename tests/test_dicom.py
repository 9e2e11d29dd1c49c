"""DICOM decoding: each kind gives the intended 8-bit pixels; bad DICOM inputs give one line and exit 2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from dicomfiles import KINDS, write_dicom, write_kind
from medclf.cli import main
from medclf.data import dicom, groups, sources
from medclf.data.store import decode_image, probe_folder_size
from medclf.errors import MedclfError


@pytest.fixture
def gray() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_decodes_to_the_intended_pixels(tmp_path, gray, kind):
    path = write_kind(tmp_path / f"{kind}.dcm", gray, kind)
    pixels = dicom.read_pixels(path)
    expected = np.repeat(gray[..., None], 3, axis=2) if kind == "rgb" else gray
    np.testing.assert_array_equal(pixels, expected)
    # the store's decoder: the same pixels as the PNG of the same image would give (gray RGB collapses to gray)
    png = tmp_path / f"{kind}.png"
    from PIL import Image

    Image.fromarray(gray).save(png)
    np.testing.assert_array_equal(decode_image(str(path), 20), decode_image(str(png), 20))


def test_window_clips_and_stretches_by_the_dicom_linear_formula(tmp_path):
    stored = np.array([[0, 900, 1000, 1100, 1200, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, window=(1000.0, 201.0))
    # PS3.3 C.11.2.1.2.1 with c=1000, w=201: below c-0.5-(w-1)/2 = 899.5 -> 0, above c-0.5+(w-1)/2 = 1099.5 -> max
    expected = [0, 255 * ((900 - 999.5) / 200 + 0.5), 255 * ((1000 - 999.5) / 200 + 0.5), 255, 255, 255]
    np.testing.assert_array_equal(dicom.read_pixels(path)[0], np.rint(expected).astype(np.uint8))


def test_rescale_slope_and_intercept_apply_before_the_window(tmp_path):
    stored = np.array([[0, 50, 100]], dtype=np.uint16)
    # stored*2 - 100 = [-100, 0, 100]; a window of centre 0.5, width 201 covers -99.5..100.5 linearly
    path = write_dicom(tmp_path / "r.dcm", stored, bits_stored=12, window=(0.5, 201.0), RescaleSlope=2,
                       RescaleIntercept=-100)
    out = dicom.read_pixels(path)[0].astype(int)
    assert out[0] == 0 and out[2] >= 254 and abs(out[1] - 127) <= 1


def test_wide_data_without_a_window_is_min_max_stretched(tmp_path):
    stored = np.array([[100, 600, 1100]], dtype=np.uint16)
    path = write_dicom(tmp_path / "m.dcm", stored, bits_stored=12)
    np.testing.assert_array_equal(dicom.read_pixels(path)[0], [0, 128, 255])


def test_monochrome1_wide_data_is_inverted_after_mapping(tmp_path):
    stored = np.array([[0, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", bits_stored=12)
    np.testing.assert_array_equal(dicom.read_pixels(path)[0], [255, 0])


def test_extensionless_and_uid_named_dicoms_are_images_in_folders(tmp_path, gray):
    for cls, name in (("a", "IM0001"), ("a", "IM0002"), ("b", "1.2.840.1.320"), ("b", "1.2.840.1.321")):
        write_kind(tmp_path / cls / name, gray, "mono8", patient=name)
    (tmp_path / "a" / "README").write_text("not an image")
    found = sources.list_images(tmp_path)
    assert sorted(Path(p).name for p in found) == ["1.2.840.1.320", "1.2.840.1.321", "IM0001", "IM0002"]
    assert decode_image(str(found[0]), 10).shape == (10, 10)
    assert probe_folder_size(found) == 20


def test_patient_ids_become_groups_when_every_image_is_a_dicom(tmp_path, gray):
    paths = [str(write_kind(tmp_path / f"{i}.dcm", gray, "mono8", patient=f"P{i // 2}")) for i in range(4)]
    assert groups.find_groups(paths) == (["P0", "P0", "P1", "P1"], "DICOM PatientID/StudyInstanceUID")
    study = str(write_kind(tmp_path / "s.dcm", gray, "mono8", patient=None))
    assert groups.dicom_groups([study]) == [pydicom.dcmread(study).StudyInstanceUID]
    png = tmp_path / "x.png"
    png.write_bytes(b"")
    assert groups.dicom_groups(paths + [str(png)]) is None  # mixed files: no DICOM grouping


def test_an_unreadable_dicom_is_skipped_or_listed_not_fatal_to_the_grouping(tmp_path, gray, capsys):
    import medclf

    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(2):
                write_kind(data / split / cls / f"{i}.dcm", gray, "mono8", patient=f"{split}{cls}{i}")
    broken = data / "train" / "a" / "broken.dcm"
    broken.write_bytes(b"not a dicom file at all")
    paths = [str(p) for p in sorted(data.rglob("*.dcm"))]
    found = groups.dicom_groups(paths)
    assert found[paths.index(str(broken))] == str(broken) and "traina0" in found  # the others keep their patients
    findings = medclf.doctor(data, out=None, progress=False)
    assert [u["item"] for u in findings["unreadable"]] == [str(broken)]
    assert main(["train", str(data), "--epochs", "1", "--no-plan", "--skip-bad", "--no-cache", "--batch-size", "4",
                 "--out", str(tmp_path / "run")]) == 0
    assert str(broken) in (tmp_path / "run" / "skipped.txt").read_text()


def test_mapping_recorded_in_a_checkpoint_must_match():
    dicom.check_mapping({"dicom_mapping": dicom.MAPPING})
    dicom.check_mapping({})  # checkpoints from before DICOM support
    with pytest.raises(MedclfError, match="DICOM mapping 'dicom-v0'"):
        dicom.check_mapping({"dicom_mapping": "dicom-v0"})


def _no_pixels(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    return path


def _multi_frame(tmp_path):
    return write_dicom(tmp_path / "multi.dcm", np.zeros((3, 4, 4), np.uint8), NumberOfFrames=3)


def _compressed(tmp_path):
    path = write_dicom(tmp_path / "jls.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # no JPEG-LS decoder is installed in the test environment
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def _not_dicom(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"not a dicom file at all")
    return path


@pytest.mark.parametrize("make, message", [
    (_no_pixels, "has no pixel data"),
    (_multi_frame, "has 3 frames"),
    (_compressed, "is compressed (JPEG-LS Lossless Image Compression) and no installed decoder reads it: install one of"),
    (_not_dicom, "cannot read DICOM file"),
])
def test_bad_dicom_inputs_are_one_line_and_exit_2(tmp_path, capsys, make, message):
    from pydicom.pixels import get_decoder

    if make is _compressed and get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = make(tmp_path)
    with pytest.raises(MedclfError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        decode_image(str(path), 8)
    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            write_kind(data / split / cls / "ok.dcm", np.zeros((8, 8), np.uint8), "mono8", patient=split + cls)
    (data / "train" / "a" / path.name).write_bytes(path.read_bytes())
    code = main(["train", str(data), "--epochs", "1", "--no-plan", "--out", str(tmp_path / "run"), "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.split(" (")[0] in err[0], err


def test_plan_fingerprints_a_dicom_folder(tmp_path, gray):
    from medclf import plan

    for split in ("train", "val"):
        for i, cls in enumerate(("a", "b")):
            for k, kind in enumerate(KINDS):
                write_kind(tmp_path / split / cls / f"{kind}.dcm", np.roll(gray, i + k), kind, patient=f"{split}{cls}{k}")
    fp = plan(str(tmp_path), do_probe=False, verbose=False)["fingerprint"]
    assert fp["dicom_mapping"] == dicom.MAPPING and fp["formats"] == {"DICOM": 8}
    assert fp["width"]["median"] == 30 and fp["bit_depth"] == 12 and fp["unreadable_in_sample"] == 0
