"""Running a trained model: the one way every consumer of a checkpoint builds its input.

`predict`, `evaluate`, `explain`, the report, `compare` (and training's own validation) all turn
uint8 images into the model's input through `preprocess(ckpt, images)`, so the image a Grad-CAM
explains is exactly the image that was predicted. `model_view` is the same picture before
normalisation, for showing what the model saw (the checkpoint's centre crop included).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import runtime, tasks
from .data import dicom, sources
from .data.augment import prepare_batch, to_device
from .data.placement import images_on_device
from .data.store import Store, build_store, native_size
from .errors import MedclfError
from .models import load_model, read_checkpoint, resolve_model_path

INFER_BATCH = 256  # images per forward pass: large batches keep every core busy, memory stays < 1 GB at 224 px


@dataclass
class LoadedModel:
    """A checkpoint's model on its device, with the settings inference runs it under."""

    model: nn.Module
    ckpt: dict[str, Any]
    device: torch.device
    precision: str
    channels_last: bool

    def predict(self, store: Store, tta: bool = False, desc: str | None = None) -> np.ndarray:
        return predict_store(self.model, store, self.ckpt, self.device, self.precision, self.channels_last,
                             tta=tta, desc=desc)


@dataclass
class GraphModel:
    """A checkpoint exported to ONNX (preprocessing inside the graph: uint8 images in, probabilities out), run on
    the CPU by ONNX Runtime or OpenVINO; `run(images)` is the engine's call on one uint8 N×C×H×W batch."""

    run: Callable[[np.ndarray], np.ndarray]
    ckpt: dict[str, Any]
    engine: str
    precision: str
    batch: int  # images handed to `run` at once (GRAPH_BATCH of the engine)

    def predict(self, store: Store, tta: bool = False, desc: str | None = None) -> np.ndarray:
        """Class probabilities (N×K float32), as `predict_store` gives them for the same checkpoint."""
        out = []
        for idx in tqdm(torch.arange(len(store)).split(self.batch), desc=desc or "predict", unit="batch",
                        leave=False, disable=desc is None or len(store) < 4 * self.batch):
            images = store.take(idx).numpy()
            probs = self.run(images)
            if tta:  # the flipped image's probabilities, averaged as predict_store averages them
                probs = (probs + self.run(np.ascontiguousarray(images[..., ::-1]))) / 2
            out.append(probs)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.ckpt["num_classes"]), np.float32)


# images per call of the graph engine: ONNX Runtime runs one call on every core and gains nothing from larger
# batches; OpenVINO splits a call into small requests for its parallel streams, and larger calls leave a stream
# idle less often while the last request of a call finishes
GRAPH_BATCH = {"onnx": 64, "openvino": 256}
ENGINES = ("torch", "onnx", "openvino", "auto")
GRAPH_PRECISIONS = ("auto", "fp32", "int8")


def load_for_inference(run_or_model: str | Path, device: str = "auto", precision: str = "auto",
                       engine: str = "torch") -> LoadedModel | GraphModel:
    """The model of a run directory or model.pt, ready to predict a store.

    engine "torch": the PyTorch model, moved to `device` in the memory format that runs fastest there;
    "onnx" / "openvino": ONNX Runtime / OpenVINO on the checkpoint's ONNX export (exported once into the cache;
    precision "int8": its static int8 quantization, made once, calibrated on the run's training images);
    "auto": the fastest fp32 engine installed on the CPU (see `auto_engine`), torch elsewhere."""
    if engine not in ENGINES:
        raise MedclfError(f"--engine {engine!r}: choose torch, onnx, openvino or auto")
    if engine == "auto":
        engine = auto_engine(runtime.pick_device(device))
    if engine in ("onnx", "openvino"):
        if device not in ("auto", "cpu"):
            raise MedclfError(f"--engine {engine} runs on the CPU; drop --device {device} or use --engine torch")
        if precision not in GRAPH_PRECISIONS:
            raise MedclfError(f"--precision {precision!r} with --engine {engine}: choose fp32 or int8")
        from .exporting import graph_runner

        ckpt = read_checkpoint(run_or_model)
        int8 = precision == "int8"
        return GraphModel(graph_runner(ckpt, resolve_model_path(run_or_model), engine, int8), ckpt, engine,
                          "int8" if int8 else "fp32", GRAPH_BATCH[engine])
    if precision == "int8":
        raise MedclfError("--precision int8 runs on the exported graph: add --engine openvino (or onnx)")
    model, ckpt = load_model(run_or_model)
    dev = runtime.pick_device(device)
    prec = runtime.pick_precision(precision, dev)
    channels_last = runtime.use_channels_last(None, dev, prec)
    model = model.to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return LoadedModel(model, ckpt, dev, prec, channels_last)


def auto_engine(device: torch.device) -> str:
    """On the CPU OpenVINO, else ONNX Runtime, else torch: the order of their fp32 speed in benchmarks/engines.py
    (README "Inference speed"); on a GPU torch."""
    if device.type != "cpu" or not onnx_export_available():
        return "torch"
    if openvino_engine_available():
        return "openvino"
    return "onnx" if onnx_engine_available() else "torch"


def onnx_export_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript"))


def onnx_engine_available() -> bool:
    import importlib.util

    return onnx_export_available() and importlib.util.find_spec("onnxruntime") is not None


def openvino_engine_available() -> bool:
    import importlib.util

    return onnx_export_available() and importlib.util.find_spec("openvino") is not None


def model_view(ckpt: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W → float N×C×S×S in [0, 1]: the checkpoint's channels, centre crop and input size."""
    channels = ckpt["in_chans"]
    return prepare_batch(images, ckpt["input_size"], [0.0] * channels, [1.0] * channels, channels,
                         crop=ckpt.get("crop", 1.0))


def normalise(ckpt: dict[str, Any], view: torch.Tensor) -> torch.Tensor:
    mean = to_device(torch.tensor(ckpt["mean"]), view).view(1, -1, 1, 1)
    std = to_device(torch.tensor(ckpt["std"]), view).view(1, -1, 1, 1)
    return (view - mean) / std


def preprocess(ckpt: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W → the model's normalised float input. The one input path of every checkpoint consumer."""
    return normalise(ckpt, model_view(ckpt, images))


def view_uint8(view: torch.Tensor) -> np.ndarray:
    """A model_view batch as uint8 images for display: N×H×W (one channel) or N×H×W×3."""
    array = view.clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


@torch.inference_mode()
def predict_store(model: nn.Module, store: Store, ckpt: dict[str, Any], device: torch.device, precision: str,
                  channels_last: bool, tta: bool = False, batch_size: int = INFER_BATCH,
                  desc: str | None = None) -> np.ndarray:
    """Class probabilities (N×K float32) for every image in the store; multi-label: a sigmoid per label."""
    task = tasks.task_of(ckpt)
    was_training = model.training
    model.eval()
    out = []
    for idx in tqdm(torch.arange(len(store)).split(batch_size), desc=desc or "predict", unit="batch", leave=False,
                    disable=desc is None or len(store) < 4 * batch_size):
        x = preprocess(ckpt, images_on_device(store, idx, device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, precision):
            logits = model(x).float()
            if tta:  # average the original and the horizontally flipped image
                logits = tasks.logits_of_mean([logits, model(x.flip(-1)).float()], task)
        out.append(tasks.to_probabilities(logits, task))  # kept on the device: one copy back at the end, no wait per batch
    model.train(was_training)
    return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, ckpt["num_classes"]), np.float32)


def open_data(ckpt: dict[str, Any], data: str, options: dict | None = None) -> sources.Source:
    """DATA opened with the training run's split settings, its validation split carved out of train as train did.
    `options` (sources.DATA_OPTIONS) override the run's own."""
    cfg = {**ckpt.get("config", {}), **(options or {})}
    seed, val_fraction = cfg.get("seed", 0), cfg.get("val_fraction", 0.1)
    source = sources.open_source(data, classes=ckpt["classes"], seed=seed, val_fraction=val_fraction,
                                 test_fraction=cfg.get("test_fraction", 0.1), **sources.data_options(cfg))
    sources.ensure_val_split(source, val_fraction, seed)
    if source.task != tasks.task_of(ckpt):
        raise MedclfError(f"{data} is a {source.task} dataset but the model was trained for a {tasks.task_of(ckpt)} task")
    return source


def split_store(ckpt: dict[str, Any], data: str | sources.Source, split: str, skip_bad: bool = False,
                cache: bool = True, options: dict | None = None) -> tuple[Store, str]:
    """One split of DATA (a path, a name, or an `open_data` result) decoded for the checkpoint; (store, source kind)."""
    source = data if isinstance(data, sources.Source) else open_data(ckpt, data, options)
    if split not in source.splits:
        raise MedclfError(f"{data if isinstance(data, str) else source.root} has no {split!r} split "
                          f"(has: {', '.join(source.splits)})")
    store_size = ckpt.get("store_size", ckpt["input_size"]) if source.kind == "folder" else native_size(source)
    dicom.check_mapping(ckpt)
    store, _ = build_store(source, split, store_size, ckpt["in_chans"], skip_bad=skip_bad, cache=cache, desc=split)
    return store, source.kind


def input_store(ckpt: dict[str, Any], inputs: list[str], skip_bad: bool = False) -> Store:
    """Image files and folders decoded for the checkpoint; labelled where a parent folder is named after a class."""
    split = sources.open_inputs(inputs)
    if not tasks.is_multilabel(ckpt):  # a folder names one class; a multi-label image's findings stay unknown
        split.labels = labels_from_parent_folders(split.paths, ckpt["classes"])
    source = sources.Source("inputs", "folder", Path("."), ckpt["classes"], {"inputs": split})
    dicom.check_mapping(ckpt)
    store, _ = build_store(source, "inputs", ckpt.get("store_size", ckpt["input_size"]), ckpt["in_chans"],
                           skip_bad=skip_bad, cache=False, desc="inputs")
    return store


def labels_from_parent_folders(paths: list[str], classes: list[str]) -> np.ndarray:
    """Known labels for images that sit in a folder named after a class (e.g. test/NORMAL/x.jpeg), or one level
    below it as the Kaggle COVID-19 layout keeps them (COVID/images/x.png); -1 otherwise."""
    index = {c: i for i, c in enumerate(classes)}

    def label(path: str) -> int:
        parent = Path(path).parent
        return index.get(parent.name, index.get(parent.parent.name, -1))

    return np.array([label(p) for p in paths], dtype=np.int64)
