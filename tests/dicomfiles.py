"""Small DICOM files written with pydicom for the tests: one per kind medclf must decode."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                window: tuple[float, float] | None = None, patient: str | None = "p1", **tags) -> Path:
    """A single-frame Secondary Capture DICOM holding `pixels` (uint8/uint16, H×W or H×W×3) as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "OT"
    if patient is not None:
        ds.PatientID = patient
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for name, value in tags.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def to_12_bit(gray: np.ndarray) -> np.ndarray:
    """8-bit values spread over 0..4095, so that a full-range window maps them back exactly."""
    return np.rint(gray.astype(np.float64) * 4095 / 255).astype(np.uint16)


FULL_12_BIT_WINDOW = (2048.0, 4096.0)  # LINEAR window over 0..4095: output = input


def write_kind(path: Path, gray: np.ndarray, kind: str, patient: str | None = "p1") -> Path:
    """`gray` (uint8 H×W) as a DICOM of one kind whose decoded pixels are `gray` again:
    'mono8' (8-bit MONOCHROME2), 'mono12' (12-bit with a window), 'mono1' (8-bit MONOCHROME1), 'rgb'."""
    if kind == "mono8":
        return write_dicom(path, gray, patient=patient)
    if kind == "mono12":
        return write_dicom(path, to_12_bit(gray), bits_stored=12, window=FULL_12_BIT_WINDOW, patient=patient)
    if kind == "mono1":
        return write_dicom(path, 255 - gray, "MONOCHROME1", patient=patient)
    if kind == "rgb":
        return write_dicom(path, np.repeat(gray[..., None], 3, axis=2), "RGB", patient=patient)
    raise ValueError(kind)


KINDS = ("mono8", "mono12", "mono1", "rgb")
