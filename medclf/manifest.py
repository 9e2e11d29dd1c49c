"""manifest.json: everything a consumer without medclf needs to feed an exported model and read its output.

Every fact comes from the checkpoint (models.py's self-describing format) and from the code that
defines the input path: `data/store.py decode_image` (file → uint8 image at the stored size) and
`inference.preprocess` (uint8 batch → the model's normalised input). An exported graph contains
`preprocess` itself, so the manifest's `preprocessing` block says what happens inside the graph
(for reference) and `decode` says what the caller must do before it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

FORMAT = "medclf-manifest/1"
SINGLE_LABEL = "single-label"


def build_manifest(checkpoint: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """The manifest of a checkpoint (a run's model.pt or an ensemble's); run_dir names its source run."""
    from . import __version__

    classes = list(checkpoint["classes"])
    stored = checkpoint.get("store_size", checkpoint["input_size"])
    config = checkpoint.get("config", {})
    return {
        "format": FORMAT,
        "classes": classes,
        "task": checkpoint.get("task", SINGLE_LABEL),
        "input": {"dtype": "uint8", "layout": "NCHW", "channels": checkpoint["in_chans"], "height": stored,
                  "width": stored, "batch": "any"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", len(classes)],
                   "meaning": output_meaning(checkpoint)},
        "decode": decode_rule(checkpoint),
        "preprocessing": preprocessing_rule(checkpoint),
        "decision": decision_rule(checkpoint),
        "model": {"arch": checkpoint["arch"], "stem": checkpoint["stem"],
                  "ensemble_members": checkpoint.get("ensemble", 1)},
        "medclf_version": __version__,
        "source": {"run": str(Path(run_dir).resolve()) if run_dir else None, "data": config.get("data"),
                   "seed": config.get("seed")},
        "weights_sha256": weights_sha256(checkpoint["state_dict"]),
    }


def output_meaning(checkpoint: dict[str, Any]) -> str:
    if checkpoint.get("task", SINGLE_LABEL) == SINGLE_LABEL:
        if "ensemble" in checkpoint:
            return "class probabilities (softmax), the mean of the member models' probabilities"
        return "class probabilities (softmax over classes; rows sum to 1)"
    return "per-class probabilities (independent sigmoid per class)"


def decode_rule(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """How medclf turns an image file into the graph's uint8 input (medclf.data.store.decode_image, _to_channels)."""
    size = checkpoint.get("store_size", checkpoint["input_size"])
    channels = checkpoint["in_chans"]
    rule = {
        "size": size,
        "steps": [
            f"open with PIL; JPEG: img.draft(None, ({size}, {size})) (reduced-scale decode)",
            "PIL.ImageOps.exif_transpose",
            "pixel mapping (see 'pixel_mapping')",
            f"if not {size}x{size}: centre square crop of the short side (left=(w-side)//2, top=(h-side)//2) "
            f"and resize to {size}x{size} in one step: img.resize(({size}, {size}), BILINEAR, box=crop, "
            "reducing_gap=2.0)",
            "to a numpy array; an RGB image whose three channels are equal is gray (H×W)",
            "channels: gray→RGB repeats the plane; RGB→gray is round(0.299 R + 0.587 G + 0.114 B)"
            if channels == 3 else "channels: RGB→gray is round(0.299 R + 0.587 G + 0.114 B) as uint8",
            f"layout C×H×W with C={channels}; stack images into N×C×H×W uint8",
        ],
        "pixel_mapping": checkpoint.get("pixel_mapping", {
            "8-bit L/RGB": "as is",
            "16-bit or float (I;16, I, F)": "linear stretch of the image's own min..max to 0..255, rounded",
            "palette/alpha": "RGBA composited on black, then RGB; LA/1 → L",
        }),
    }
    if checkpoint.get("dicom_mapping"):  # the rule that turned DICOM files into 8-bit images in training
        from .data.dicom import MAPPING_STEPS

        rule["dicom"] = {"mapping": checkpoint["dicom_mapping"], "steps": list(MAPPING_STEPS)}
    return rule


def preprocessing_rule(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What medclf.inference.preprocess does to the uint8 batch; inside the exported graph."""
    return {
        "in_graph": True,
        "scale": "x / 255 (float32)",
        "crop": checkpoint.get("crop", 1.0),
        "resize": (f"centre crop of crop·H × crop·W resized to {checkpoint['input_size']}×{checkpoint['input_size']} "
                   "by bilinear grid_sample (reflection padding, align_corners=False); skipped when crop is 1 and "
                   "the input is already that size"),
        "input_size": checkpoint["input_size"],
        "mean": list(checkpoint["mean"]),
        "std": list(checkpoint["std"]),
        "normalise": "(x - mean) / std per channel",
    }


def decision_rule(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The operating point chosen on validation, if the run chose one."""
    if checkpoint.get("thresholds") is not None:  # multi-label: one per class
        return {"rule": "class c is present when probability[c] >= thresholds[c]",
                "thresholds": checkpoint["thresholds"], "chosen_on": "validation"}
    threshold = checkpoint.get("threshold")
    if threshold is not None and len(checkpoint["classes"]) == 2:
        positive = checkpoint["classes"][1]
        chosen_on = "out-of-fold predictions" if checkpoint.get("folds") else "validation (Youden's J)"
        return {"rule": f"{positive!r} when probability[1] >= threshold", "threshold": threshold,
                "positive_class": positive, "chosen_on": chosen_on}
    return {"rule": "the class with the highest probability", "threshold": None}


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the weights (name, dtype, shape and bytes of each tensor, in name order): same weights, same hash."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
