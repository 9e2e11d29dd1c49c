"""int8 static quantization of an exported ONNX model, judged on the run's validation split.

ONNX Runtime's static quantization (QDQ, per-channel int8 weights, 7-bit in the stems, uint8 activations;
the preprocessing and the final softmax stay in float, see `float_nodes_and_stem_weights`) needs the
ranges of the activations: they are measured on images of the training split (the run's splits.csv
says which), never on the validation images it is then judged on. The report puts validation
accuracy/AUC of both models next to their speed; the export recommends int8 only within a tolerance.
"""
from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data.store import Store
from .errors import MedclfError
from .inference import open_data, split_store
from .metrics import classification_metrics

TIMING_BATCH = 32


def quantize_int8(fp32_path: Path, int8_path: Path, ckpt: dict[str, Any], data: str | None, run_dir: Path,
                  calibration_images: int, tolerance: dict[str, float]) -> dict[str, Any]:
    """Write int8_path; the calibration and validation report (accuracy/AUC change, speed-up, within tolerance)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = data or ckpt.get("config", {}).get("data")
    if not data:
        raise MedclfError("--quantize int8 needs the run's data for calibration and validation: give --data DATA")
    source = open_data(ckpt, data)
    train, _ = split_store(ckpt, source, "train")
    calibration = calibration_batch(train, run_dir / "splits.csv", calibration_images, ckpt.get("config", {}).get("seed", 0))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 16)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        kept, stems = float_nodes_and_stem_weights(prepared)
        # the stems' weights in 7 bits (reduce_range): CPUs without VNNI (AVX2, plain AVX512) multiply uint8
        # activations by int8 weights with VPMADDUBSW, whose int16 sum of two products saturates; ONNX Runtime
        # and OpenVINO both use it there. The stem reads the normalised image, dense over the whole uint8 range,
        # where deeper convolutions read sparse post-ReLU maps: with 8-bit stem weights trained models'
        # probabilities moved by up to 0.5 (README, Inference engines). Deeper weights keep their 8 bits.
        overrides = {name: [{"reduce_range": True, "axis": 0}] for name in stems}
        quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=kept,
                        extra_options={"TensorQuantOverrides": overrides})
    val, _ = split_store(ckpt, source, "val")
    return validation_report(fp32_path, int8_path, val, ckpt["classes"], len(calibration), tolerance)


def float_nodes_and_stem_weights(model_path: Path) -> tuple[list[str], list[str]]:
    """The nodes that stay in float, and the weights of the stem convolutions (the first convolution of each
    ensemble member, reading the preprocessed image). In float: the preprocessing of the uint8 image (every
    node before a stem, so the input rule stays exact) and the softmax/sigmoid behind the network (quantized
    probabilities would be multiples of 1/255, which ties ranks and moves AUC). Every convolution is
    quantized."""
    import onnx

    nodes = onnx.load(str(model_path), load_external_data=False).graph.node  # in topological order
    after_conv: set[str] = set()  # tensors computed from some convolution's output
    kept, stems = [], []
    for node in nodes:
        downstream = any(name in after_conv for name in node.input)
        if node.op_type == "Conv" and not downstream:
            stems.append(node.input[1])
        if downstream or node.op_type == "Conv":
            after_conv.update(node.output)
        else:
            kept.append(node.name)
        if downstream and node.op_type in ("Softmax", "Sigmoid"):
            kept.append(node.name)
    return kept, stems


def calibration_batch(train: Store, splits_csv: Path, count: int, seed: int) -> np.ndarray:
    """Up to `count` training images (uint8 N×C×H×W), drawn at random among the run's recorded training ids."""
    ids = np.array(train.ids)
    if splits_csv.is_file():
        with splits_csv.open(newline="") as f:
            recorded = {row["id"] for row in csv.DictReader(f) if row["split"] == "train"}
        chosen = np.flatnonzero(np.isin(ids, list(recorded)))
        if len(chosen) == 0:
            raise MedclfError(f"none of the training images in {splits_csv} is in the data now; give the run's "
                              f"data with --data")
    else:  # a bare model.pt: the training split as rebuilt from its config
        chosen = np.arange(len(ids))
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(chosen, size=min(count, len(chosen)), replace=False))
    return train.take(torch.from_numpy(picked)).numpy()


def validation_report(fp32_path: Path, int8_path: Path, val: Store, classes: list[str], calibrated_on: int,
                      tolerance: dict[str, float]) -> dict[str, Any]:
    from .exporting import onnx_runner

    images, labels = val.images if isinstance(val.images, np.ndarray) else val.images.numpy(), val.labels.numpy()
    result: dict[str, Any] = {"calibration_images": calibrated_on, "calibrated_on": "training split",
                              "validation_images": int(len(labels)), "tolerance": tolerance}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        probs, seconds = timed_probabilities(onnx_runner(path), images)
        metrics = classification_metrics(labels, probs, classes)
        result[name] = {"accuracy": metrics["accuracy"], "auc": metrics["auc"], "images_per_s": len(images) / seconds}
    result["change"] = {key: _difference(result["int8"][key], result["fp32"][key]) for key in ("accuracy", "auc")}
    result["speedup"] = result["int8"]["images_per_s"] / result["fp32"]["images_per_s"]
    # either way: a large gain also means int8 answers differently, and the validation threshold no longer fits it
    result["within_tolerance"] = within_tolerance(result["change"], tolerance)
    return result


def within_tolerance(change: dict[str, float | None], tolerance: dict[str, float]) -> bool:
    """Every metric moved by at most its limit. The metrics are fractions of the validation images, so a
    change of exactly the limit (one image of 100 for 0.01) is compared free of float rounding."""
    return all(change[key] is not None and round(abs(change[key]), 9) <= limit for key, limit in tolerance.items())


def timed_probabilities(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> tuple[np.ndarray, float]:
    """Probabilities for all images by `run` (uint8 batch → probabilities) and the seconds they took (after one
    warm-up batch)."""
    run(images[:TIMING_BATCH])
    start = time.perf_counter()
    probs = [run(images[i:i + TIMING_BATCH]) for i in range(0, len(images), TIMING_BATCH)]
    return np.concatenate(probs), time.perf_counter() - start


def _difference(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or np.isnan(new) or np.isnan(old):
        return None
    return float(new - old)
