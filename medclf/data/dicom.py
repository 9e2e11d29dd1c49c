"""DICOM files as 8-bit images, by one fixed mapping that training and inference share.

The mapping (`MAPPING`, recorded in every checkpoint as "dicom_mapping" and part of the decoded-store
cache key) turns a single-frame DICOM's stored values into the store's uint8 pixels:

1. the Modality LUT (Rescale Slope/Intercept, or a Modality LUT Sequence);
2. the VOI transform of the file: its first VOI LUT, else its first stored window (Window Center/Width,
   with its VOI LUT Function), the transform's whole output range mapped linearly onto 0..255;
3. without a VOI LUT or window: 8-bit data unchanged, wider data min-max of the image's own values onto 0..255;
4. MONOCHROME1 (white is low) inverted, so that bone is bright as in MONOCHROME2;
5. colour (RGB, or YBR converted to RGB by pydicom): 8-bit data unchanged, wider data min-max.

Multi-frame files are refused (which frame to train on is the user's choice); compressed transfer
syntaxes decode through pydicom's plug-ins (pylibjpeg, GDCM) when installed. pydicom is imported only here,
and only when a DICOM file is read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MedclfError

MAPPING = "dicom-v1"  # bump when the steps above change: checkpoints and cached stores name the mapping they used
SUFFIXES = {".dcm", ".dicom"}
# the mapping's steps in words, for manifest.json (a consumer without medclf must reproduce them for DICOM input)
MAPPING_STEPS = (
    "read with pydicom; single-frame only (multi-frame files are refused)",
    "Modality LUT (Rescale Slope/Intercept, or the Modality LUT Sequence)",
    "VOI: the first VOI LUT, else the first stored window (Window Center/Width, with its VOI LUT Function), "
    "its whole output range mapped linearly onto 0..255, rounded",
    "no VOI LUT or window: 8-bit data unchanged, wider data min..max of the image's own values onto 0..255, rounded",
    "MONOCHROME1 inverted (255 - value)",
    "colour (RGB; YBR converted to RGB by pydicom): 8-bit unchanged, wider data min..max onto 0..255",
    "then the same resize, crop and channel steps as any other image",
)
PREAMBLE_BYTES = 132  # a 128-byte preamble, then "DICM"
DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def has_preamble(path: str | Path) -> bool:
    """A DICOM Part 10 file: bytes 128..131 are b"DICM"."""
    try:
        with open(path, "rb") as f:
            head = f.read(PREAMBLE_BYTES)
    except OSError:
        return False
    return len(head) == PREAMBLE_BYTES and head[128:] == b"DICM"


def may_be_dicom(path: str | Path) -> bool:
    """Whether a name could be a DICOM without an image extension: none, or a number (1.2.840....3.320)."""
    suffix = Path(path).suffix
    return not suffix or suffix[1:].isdigit()


def is_dicom(path: str | Path) -> bool:
    """A .dcm/.dicom file, or a file named without an image extension that starts like DICOM."""
    if Path(path).suffix.lower() in SUFFIXES:
        return True
    return may_be_dicom(path) and has_preamble(path)


def _read(path: str | Path, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        raise MedclfError(f"cannot read DICOM file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def header(path: str | Path):
    """The file's data set without its pixel data (fast)."""
    return _read(path, pixels=False)


def describe(path: str | Path) -> tuple[int, int, str, int]:
    """(width, height, photometric interpretation, bits stored) from the header, for the plan's fingerprint."""
    ds = header(path)
    if "Rows" not in ds or "Columns" not in ds:
        raise MedclfError(f"DICOM file {path} has no pixel data (no Rows/Columns), so it is no image")
    return (int(ds.Columns), int(ds.Rows), str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
            int(ds.get("BitsStored", 8)))


def group_of(path: str | Path) -> str | None:
    """The patient (PatientID), else the study (StudyInstanceUID) of a DICOM file; None when it names neither."""
    ds = header(path)
    for tag in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(tag, "") or "").strip()
        if value:
            return value
    return None


def read_pixels(path: str | Path) -> np.ndarray:
    """The file's image as uint8 H×W (grayscale) or H×W×3 (colour), by the mapping in the module docstring."""
    ds = _read(path, pixels=True)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise MedclfError(f"DICOM file {path} has no pixel data (a report, a structured document or a "
                          "header-only file), so it is no image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MedclfError(f"DICOM file {path} has {frames} frames; medclf reads single-frame images only "
                          "(export the frame to train on as its own file)")
    values = _decode(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if values.ndim == 3:
        return _colour(values, ds)
    if values.ndim != 2:
        raise MedclfError(f"DICOM file {path} holds a {values.ndim}-D pixel array; expected one 2-D image")
    gray = _gray(values, ds, path)
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _decode(ds, path) -> np.ndarray:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        missing = _missing_decoder(syntax)
        if missing:
            raise MedclfError(f"DICOM file {path} is compressed ({syntax.name}) and no installed decoder reads it: "
                              f"{missing}")
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError, ImportError, ValueError, AttributeError, KeyError) as exc:
        # corrupt compressed data, or a pixel module whose sizes and bit depths disagree with the data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedclfError(f"cannot decode the pixels of DICOM file {path}: {first}") from None


def _missing_decoder(syntax) -> str | None:
    """What to install when no pydicom plug-in decodes `syntax`; None when one is available."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:  # a compressed syntax pydicom has no decoder for at all
        return f"pydicom cannot decode it; convert it to an uncompressed transfer syntax ({DECODER_HINT} may help)"
    if decoder.is_available:
        return None
    needs = [str(m).split(" - requires ")[-1] for m in decoder.missing_dependencies]
    return "install one of: " + "; ".join(needs) if needs else DECODER_HINT


def _gray(stored: np.ndarray, ds, path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(stored, ds)
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        lut = apply_voi(np.arange(first, first + entries), ds)
        return _linear(apply_voi(np.rint(values).astype(np.int64), ds), float(lut.min()), float(lut.max()))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            low, high = apply_windowing(np.array([-1e12, 1e12]), ds)  # the window's output range
            return _linear(apply_windowing(values, ds), float(low), float(high))
        except ValueError as exc:  # a window width < 1, an unknown VOI LUT Function
            raise MedclfError(f"DICOM file {path} has an unusable window: {exc}") from None
    if values.dtype == np.uint8:  # 8-bit data with no modality rescale
        return values
    return _min_max(values)


def _colour(values: np.ndarray, ds) -> np.ndarray:
    if values.shape[-1] != 3:
        raise MedclfError(f"DICOM colour image has {values.shape[-1]} samples per pixel; expected 3")
    return values if values.dtype == np.uint8 else _min_max(values)


def _linear(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.rint((np.asarray(values, np.float64) - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def _min_max(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return _linear(values, float(values.min()), float(values.max()))


def check_mapping(ckpt: dict) -> None:
    """A checkpoint trained under another DICOM mapping would see other pixels here than in training."""
    used = ckpt.get("dicom_mapping")
    if used is not None and used != MAPPING:
        raise MedclfError(f"the model was trained with DICOM mapping {used!r}; this medclf applies {MAPPING!r}, so "
                          "its DICOM inputs would differ from training: use the medclf version that trained it")
