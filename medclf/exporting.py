"""`medclf export`: a run's model as one ONNX (or TorchScript) file plus manifest.json, for use without medclf.

The exported graph takes what medclf's decoder produces (uint8 N×C×H×W at the checkpoint's stored size)
and returns class probabilities: `inference.preprocess` (scale, centre crop, resize, normalise) runs
inside it, traced from the same function every medclf command uses, so there is no second copy of the
rule. An ensemble (cross-validation's fold models) exports as one graph answering with the members'
mean probability. `--quantize int8` adds ONNX Runtime's static int8 quantization, calibrated on
training-split images, and records its validation accuracy/AUC change and speed-up in the manifest.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import atomic
from .errors import MedclfError
from .inference import preprocess
from .manifest import SINGLE_LABEL, build_manifest
from .model_card import CARD
from .models import load_model, resolve_model_path

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INT8_FILE = "model.int8.onnx"
# int8 is recommended (manifest "recommended_model") only when validation accuracy and AUC move by no more
# than this, up or down
INT8_TOLERANCE = {"accuracy": 0.01, "auc": 0.005}
# how the graph is built from a checkpoint (Deployable, the stem rewrite) and how int8 is quantized from it
# (quantize.py): bump on any change, so the engines' cached exports (cached_onnx) are made again, not reused
GRAPH_RECIPE = "graph-3: space-to-depth stem, crop sampled as channels"
INT8_RECIPE = "int8-3: every conv, 7-bit stem weights"
EXAMPLE_BATCH = 2


class SpaceToDepthStem(nn.Module):
    """A 7×7 stride-2 convolution (ResNet's ImageNet stem) computed as a 4×4 stride-1 convolution over 2×2
    pixel blocks: the same sums (the kernel padded to 8×8 with zero taps), so the same output up to float
    rounding. The engines' convolution kernels, float and int8, use one input channel poorly; four (a 2×2
    block per channel) suit them better (README, Inference engines). The same
    rewrite is known from TPU ResNet-50 training ("space-to-depth" conv0)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        out_chans, in_chans = conv.weight.shape[:2]
        kernel = F.pad(conv.weight.detach(), (0, 1, 0, 1))  # 8×8: tap 7 is zero
        # kernel[o, c, 2a + i, 2b + j] → weight[o, 4c + 2i + j, a, b], pixel_unshuffle's channel order
        weight = kernel.reshape(out_chans, in_chans, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4)
        self.weight = nn.Parameter(weight.reshape(out_chans, 4 * in_chans, 4, 4).contiguous(), requires_grad=False)
        self.bias = conv.bias

    @staticmethod
    def fits(module: nn.Module) -> bool:
        return (isinstance(module, nn.Conv2d) and module.kernel_size == (7, 7) and module.stride == (2, 2)
                and module.padding == (3, 3) and module.dilation == (1, 1) and module.groups == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # the stem's 3-pixel zero padding, one more on an odd side so that the blocks tile it
        x = F.pad(x, (3, 3 + width % 2, 3, 3 + height % 2))
        return F.conv2d(F.pixel_unshuffle(x, 2), self.weight, self.bias)


def with_space_to_depth_stems(model: nn.Module) -> nn.Module:
    """A copy of the model with every ImageNet stem (an ensemble has one per member) as a SpaceToDepthStem."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if SpaceToDepthStem.fits(module):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, SpaceToDepthStem(module))
    return model


class Deployable(nn.Module):
    """A checkpoint's model with medclf's input path in front and softmax behind: uint8 images → probabilities.
    The exported graph computes the stem by SpaceToDepthStem (faster in the graph engines, same answers)."""

    def __init__(self, model: nn.Module, ckpt: dict[str, Any]):
        super().__init__()
        self.model = with_space_to_depth_stems(model.eval())
        self.input_spec = {key: ckpt[key] for key in ("in_chans", "input_size", "mean", "std")}
        self.input_spec["crop"] = ckpt.get("crop", 1.0)
        self.single_label = ckpt.get("task", SINGLE_LABEL) == SINGLE_LABEL  # as manifest.output_meaning says

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(preprocess(self.input_spec, images)).float()
        return logits.softmax(1) if self.single_label else logits.sigmoid()


def export(run_or_model: str | Path, format: str = "onnx", out: str | Path | None = None,
           quantize: str | None = None, data: str | None = None, calibration_images: int = 128) -> dict[str, Any]:
    """Write the model file and manifest.json into `out` (default: RUN-export next to the run); the manifest."""
    if format not in FORMATS:
        raise MedclfError(f"--format {format!r}: choose onnx or torchscript")
    if quantize not in (None, "int8"):
        raise MedclfError(f"--quantize {quantize!r}: the only quantization is int8")
    if quantize and format != "onnx":
        raise MedclfError("--quantize int8 needs --format onnx (ONNX Runtime quantizes the ONNX graph)")
    model_path = resolve_model_path(run_or_model)
    folder = export_folder(model_path, out)
    model, ckpt = load_model(model_path)
    manifest = build_manifest(ckpt, model_path.parent)
    deployable = Deployable(model, ckpt)
    if format == "onnx":
        write_onnx(deployable, ckpt, folder / FORMATS["onnx"])
        manifest["opset"] = onnx_opset(folder / FORMATS["onnx"])
    else:
        write_torchscript(deployable, ckpt, folder / FORMATS["torchscript"])
    manifest["files"] = {"model": FORMATS[format], "format": format}
    manifest["recommended_model"] = FORMATS[format]
    card = model_path.parent / CARD
    if card.is_file():  # the model card travels with the model
        shutil.copyfile(card, folder / CARD)
        manifest["files"]["model_card"] = CARD
    if quantize:
        from .quantize import quantize_int8

        report = quantize_int8(folder / FORMATS["onnx"], folder / INT8_FILE, ckpt, data, model_path.parent,
                               calibration_images, INT8_TOLERANCE)
        manifest["files"]["int8"] = INT8_FILE
        manifest["quantization"] = report
        if report["within_tolerance"]:
            manifest["recommended_model"] = INT8_FILE
    atomic.write_text(folder / "manifest.json", json.dumps(manifest, indent=2))
    return {**manifest, "folder": str(folder)}


def export_folder(model_path: Path, out: str | Path | None) -> Path:
    """--out, or RUN-export beside the run (a run directory holds only the files training writes)."""
    folder = Path(out).expanduser() if out else model_path.parent.with_name(model_path.parent.name + "-export")
    if folder.exists() and not folder.is_dir():
        raise MedclfError(f"--out {folder} is a file; give a folder for the exported model")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def example_input(ckpt: dict[str, Any]) -> torch.Tensor:
    size = ckpt.get("store_size", ckpt["input_size"])
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (EXAMPLE_BATCH, ckpt["in_chans"], size, size), dtype=torch.uint8, generator=generator)


def write_onnx(deployable: Deployable, ckpt: dict[str, Any], path: Path) -> None:
    """torch.onnx's current (torch.export-based) exporter, with a dynamic batch axis."""
    try:
        import onnx  # noqa: F401 - the exporter needs it; a clear message beats its ImportError
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MedclfError(f"exporting to ONNX needs the onnx and onnxscript packages ({exc.name} is missing): "
                          f"pip install onnx onnxscript") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), open(os.devnull, "w") as quiet, \
            contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")  # tracer chatter about constants and shape guards
        program = torch.onnx.export(deployable, (example_input(ckpt),), input_names=["image"],
                                    output_names=["probabilities"], dynamic_shapes={"images": {0: batch}},
                                    dynamo=True, verbose=False)
    atomic.write_with(path, lambda tmp: program.save(str(tmp)))


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def write_torchscript(deployable: Deployable, ckpt: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about constants: the traced values are the checkpoint's
        traced = torch.jit.trace(deployable, (example_input(ckpt),), check_trace=False)
    atomic.write_with(path, lambda tmp: traced.save(str(tmp)))



def cached_onnx(ckpt: dict[str, Any], model_path: Path) -> Path:
    """The checkpoint's ONNX export in the medclf data folder, exported on first use.

    Keyed by what the graph computes: the weights, the input rule (manifest "input" and "preprocessing"),
    the task, the medclf version and how the graph and its int8 copy are made (GRAPH_RECIPE, INT8_RECIPE), so
    a retrained or changed model, or a changed export, never reuses an old file, and every run of the same
    model shares one."""
    from .data.named import data_home

    manifest = build_manifest(ckpt)
    keyed = {key: manifest[key] for key in ("input", "preprocessing", "task", "weights_sha256", "medclf_version")}
    keyed["recipes"] = [GRAPH_RECIPE, INT8_RECIPE]
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:24]
    path = data_home() / "exports" / key / FORMATS["onnx"]
    if not path.is_file():
        model, ckpt = load_model(model_path)
        write_onnx(Deployable(model, ckpt), ckpt, path)
    return path


def cached_int8(ckpt: dict[str, Any], model_path: Path) -> Path:
    """The cached ONNX export's int8 quantization beside it, made on first use (as `export --quantize int8`:
    calibrated on the run's training images, judged on its validation split; the report is kept as int8.json).
    A model that int8 changes beyond INT8_TOLERANCE still runs, with a warning naming the change."""
    fp32 = cached_onnx(ckpt, model_path)
    path = fp32.with_name(INT8_FILE)
    report_path = fp32.with_name("int8.json")
    if not path.is_file():
        from .quantize import quantize_int8

        def write(tmp: Path) -> None:
            report = quantize_int8(fp32, tmp, ckpt, None, model_path.parent, 128, INT8_TOLERANCE)
            atomic.write_text(report_path, json.dumps(report, indent=2))

        atomic.write_with(path, write)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if report and not report.get("within_tolerance", True):
        print(f"medclf: warning: int8 changes this model's validation metrics by {report['change']} "
              f"(tolerance {INT8_TOLERANCE}); fp32 answers as the run reported", file=sys.stderr)
    return path


def session_options() -> Any:
    """ONNX Runtime settings for CPU inference: every core this process may use, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cpu_threads()
    return options


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime on one ONNX file: uint8 batch → probabilities."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MedclfError("--engine onnx needs ONNX Runtime: pip install onnxruntime (or use --engine torch)") from None
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"image": images})[0]


OPENVINO_CHUNK = 8  # images per OpenVINO request: small requests keep every stream (one per core) busy


def openvino_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """OpenVINO on one ONNX file: uint8 batch → probabilities. It runs in throughput mode: one stream per core,
    each batch split into OPENVINO_CHUNK-image requests that the streams take in parallel (faster on a CPU
    than one request using every core). fp32 graphs run in fp32 (OpenVINO would otherwise pick bf16 on CPUs
    that have it, and the answers would differ from the run's); a quantized graph runs its int8 convolutions."""
    try:
        import openvino as ov
    except ImportError:
        raise MedclfError("--engine openvino needs OpenVINO: pip install openvino (or use --engine onnx)") from None
    compiled = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                                                          "INFERENCE_PRECISION_HINT": "f32",
                                                          "NUM_STREAMS": cpu_threads()})
    queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    results: dict[int, np.ndarray] = {}
    queue.set_callback(lambda request, i: results.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def run(images: np.ndarray) -> np.ndarray:
        results.clear()
        starts = range(0, len(images), OPENVINO_CHUNK)
        for i, start in enumerate(starts):
            queue.start_async({0: images[start:start + OPENVINO_CHUNK]}, i)
        queue.wait_all()
        return np.concatenate([results[i] for i in range(len(starts))])
    return run


def graph_runner(ckpt: dict[str, Any], model_path: Path, engine: str, int8: bool = False
                 ) -> Callable[[np.ndarray], np.ndarray]:
    """The checkpoint's (cached) ONNX export, fp32 or int8, run by `engine` ("onnx" or "openvino")."""
    path = cached_int8(ckpt, model_path) if int8 else cached_onnx(ckpt, model_path)
    return (openvino_runner if engine == "openvino" else onnx_runner)(path)
