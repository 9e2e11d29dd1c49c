"""`medclf explain`: Grad-CAM overlays for images, preprocessed by the one input path `predict` uses."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from . import atomic, tasks
from .errors import MedclfError
from .gradcam import grad_cam, save_overlay
from .inference import input_store, load_for_inference, model_view, normalise, view_uint8

CAM_BATCH = 32
COLUMNS = ["path", "label", "prediction", "probability", "explained_class", "gradcam"]


def explain(run_or_model: str, images: list[str], out: str | Path = "explain", target: str | None = None,
            device: str = "auto", precision: str = "auto", skip_bad: bool = False) -> list[dict]:
    """Write OUT/<image name>.gradcam.png for every image (files or folders) and OUT/explain.csv.

    Each PNG shows the image as the model saw it (the checkpoint's crop and size) and its Grad-CAM
    overlay for the predicted class (or `target`), titled with the prediction and its probability.
    Multi-label models: the prediction is the decided label set and the overlay explains the most probable
    label (or `target`, any of the labels). Returns one row per image.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise MedclfError(f"--out {out} is a file; explain writes a folder of overlays and explain.csv there")
    loaded = load_for_inference(run_or_model, device, precision)
    ckpt = loaded.ckpt
    classes = ckpt["classes"]
    if target is not None and target not in classes:
        raise MedclfError(f"--class {target!r} is not one of the model's classes: {', '.join(classes)}")
    store = input_store(ckpt, images, skip_bad)
    probs = loaded.predict(store, desc="explain")
    decisions = tasks.predicted_names(probs, ckpt)
    name_explained = target is not None or tasks.is_multilabel(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    names = _output_names([Path(p) for p in store.ids])
    rows = []
    for idx in torch.arange(len(store)).split(CAM_BATCH):
        view = model_view(ckpt, store.take(idx).to(loaded.device))
        pred = probs[idx.numpy()].argmax(1)
        explained = pred if target is None else [classes.index(target)] * len(idx)
        cams = grad_cam(loaded.model, normalise(ckpt, view), target=torch.as_tensor(explained)).cpu().numpy()
        shown = view_uint8(view)
        for j, i in enumerate(idx.tolist()):
            p, c = probs[i], int(explained[j])
            title = f"{decisions[i] or 'no label'} {p[int(pred[j])]:.2f}"
            if name_explained:
                title += f" · Grad-CAM for {classes[c]} ({p[c]:.2f})"
            path = out / names[i]
            save_overlay(path, _upscale(shown[j]), cams[j], title=title)
            label = int(store.labels[i])
            rows.append({"path": store.ids[i], "label": classes[label] if label >= 0 else "",
                         "prediction": decisions[i], "probability": float(p[int(pred[j])]),
                         "explained_class": classes[c], "gradcam": str(path)})
    with atomic.open_atomic(out / "explain.csv", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _upscale(image, side: int = 224):
    """Small images (MedMNIST 28 px) upscaled with nearest neighbours so the overlay is readable."""
    import numpy as np
    from PIL import Image

    if min(image.shape[:2]) >= side:
        return image
    factor = -(-side // min(image.shape[:2]))
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((pil.size[0] * factor, pil.size[1] * factor), Image.Resampling.NEAREST))


def _output_names(paths: list[Path]) -> list[str]:
    """<stem>.gradcam.png, with the parent folder's name (then a number) added where two images share a stem."""
    names, taken = [], set()
    for p in paths:
        name = f"{p.stem}.gradcam.png"
        if name in taken:
            name = f"{p.parent.name}_{p.stem}.gradcam.png"
        k = 2
        while name in taken:
            name = f"{p.stem}-{k}.gradcam.png"
            k += 1
        taken.add(name)
        names.append(name)
    return names
