"""Class probabilities from a `medclf export` folder with ONNX Runtime, NumPy and Pillow only (no medclf, no torch;
pydicom too for DICOM files).

    python examples/onnx_predict.py EXPORT_DIR image.png folder/ ... [--out predictions.csv]
    python examples/onnx_predict.py EXPORT_DIR data.npz:val          # the rows of val_images in a MedMNIST .npz

It decodes each image the way manifest.json's "decode" section says (what medclf does before the
model; DICOM files by its "dicom" mapping steps), stacks them into the uint8 N×C×H×W batch the graph
takes, and writes one CSV row per image: path (or npz row index), prediction, prob_<class>..., the same
columns as `medclf predict`.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file → uint8 C×size×size, following the manifest's decode steps."""
    if is_dicom(path):
        img = Image.fromarray(dicom_to_8bit(path))
    else:
        with Image.open(path) as opened:
            opened.draft(None, (size, size))
            img = to_8bit(ImageOps.exif_transpose(opened))
    if img.size != (size, size):
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                         reducing_gap=2.0)
    array = np.asarray(img)
    if array.ndim == 3 and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
        array = array[..., 0]
    return to_channels(array[None] if array.ndim == 2 else array.transpose(2, 0, 1), channels)


def is_dicom(path: Path) -> bool:
    """A .dcm/.dicom file, or one named without an image extension (none, or a number) that starts like DICOM."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix and not path.suffix[1:].isdigit():
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def dicom_to_8bit(path: Path) -> np.ndarray:
    """The manifest's "dicom" mapping steps: a single-frame DICOM as uint8 H×W (or H×W×3 colour)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    ds = pydicom.dcmread(path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SystemExit(f"{path}: multi-frame DICOM; export the frame to classify as its own file")
    values = ds.pixel_array
    if values.ndim == 3:  # colour: 8-bit unchanged, wider data min..max
        return values if values.dtype == np.uint8 else linear(values, values.min(), values.max())
    values = apply_modality_lut(values, ds)
    if ds.get("VOILUTSequence"):  # the first VOI LUT, its whole output range onto 0..255
        item = ds.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        lut = apply_voi(np.arange(first, first + entries), ds)
        gray = linear(apply_voi(np.rint(values).astype(np.int64), ds), lut.min(), lut.max())
    elif "WindowCenter" in ds and "WindowWidth" in ds:  # the first window, its output range onto 0..255
        low, high = apply_windowing(np.array([-1e12, 1e12]), ds)
        gray = linear(apply_windowing(values, ds), low, high)
    elif values.dtype == np.uint8:
        gray = values
    else:
        gray = linear(values, values.min(), values.max())
    return 255 - gray if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" else gray


def linear(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """low..high onto 0..255, rounded and clipped (all 0 when the range is empty)."""
    low, high = float(low), float(high)
    if high <= low:
        return np.zeros(np.shape(values), np.uint8)
    return np.clip(np.rint((np.asarray(values, np.float64) - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def to_8bit(img: Image.Image) -> Image.Image:
    """The manifest's pixel mapping: 16-bit/float stretched to 0..255, alpha composited on black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().astype(np.uint8), "L")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("LA", "1"):
        return img.convert("L")
    if img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if "A" in img.getbands() or img.mode == "P":
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """C×H×W with the model's channel count: gray repeated to RGB, or RGB to luminance."""
    if channels == 1 and array.shape[0] == 3:
        array = (array * GRAY_WEIGHTS[:, None, None]).sum(0, keepdims=True).round().astype(np.uint8)
    if channels == 3 and array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return array


def npz_rows(spec: str, channels: int) -> tuple[list[str], np.ndarray]:
    """'data.npz:val' → row indices and the uint8 N×C×H×W images of val_images (used as stored)."""
    path, split = spec.rsplit(":", 1)
    images = np.load(path)[f"{split}_images"]
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    batch = np.stack([to_channels(image, channels) for image in images])
    return [str(i) for i in range(len(batch))], batch


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")
                            and (p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p)))
        else:
            files.append(item)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("inputs", nargs="+", help="image files, folders, or FILE.npz:SPLIT")
    ap.add_argument("--model", help="model file in EXPORT_DIR (default: the manifest's recommended model)")
    ap.add_argument("--out", default="-", help="CSV file ('-': stdout)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)

    manifest = json.loads((args.export_dir / "manifest.json").read_text())
    size, channels, classes = manifest["decode"]["size"], manifest["input"]["channels"], manifest["classes"]
    if len(args.inputs) == 1 and ".npz:" in args.inputs[0]:
        key, (ids, images) = "index", npz_rows(args.inputs[0], channels)
    else:
        files = image_files(args.inputs)
        key, ids = "path", [str(p) for p in files]
        images = np.stack([decode(p, size, channels) for p in files])

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(args.export_dir / (args.model or manifest["recommended_model"])), options,
                                   providers=["CPUExecutionProvider"])
    probs = np.concatenate([session.run(None, {"image": images[i:i + args.batch_size]})[0]
                            for i in range(0, len(images), args.batch_size)])

    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="")
    writer = csv.writer(out)
    writer.writerow([key, "prediction"] + [f"prob_{c}" for c in classes])
    for ident, p in zip(ids, probs):
        writer.writerow([ident, classes[int(p.argmax())]] + [repr(float(v)) for v in p])
    if out is not sys.stdout:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
