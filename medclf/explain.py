"""`medclf explain`: Grad-CAM overlays for images, preprocessed exactly as `predict` does."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from .data import sources
from .data.augment import prepare_batch
from .data.store import build_store
from .errors import MedclfError
from .evaluate import _labels_from_parent_folders, _load_for_inference, predict_store
from .gradcam import grad_cam, save_overlay

CAM_BATCH = 32


def explain(run_or_model: str, images: list[str], out: str | Path = "explain", target: str | None = None,
            device: str = "auto", precision: str = "auto", skip_bad: bool = False) -> list[dict]:
    """Write OUT/<image name>.gradcam.png for every image (files or folders) and OUT/explain.csv.

    Each PNG shows the image and its Grad-CAM overlay for the predicted class (or `target`),
    titled with the prediction and its probability. Returns one row per image.
    """
    model, ckpt, dev, prec, cl = _load_for_inference(run_or_model, device, precision)
    classes = ckpt["classes"]
    if target is not None and target not in classes:
        raise MedclfError(f"--class {target!r} is not one of the model's classes: {', '.join(classes)}")
    split = sources.open_inputs(images)
    split.labels = _labels_from_parent_folders(split.paths, classes)
    source = sources.Source("inputs", "folder", Path("."), classes, {"inputs": split})
    store, _ = build_store(source, "inputs", ckpt.get("store_size", ckpt["input_size"]), ckpt["in_chans"],
                           skip_bad=skip_bad, cache=False, desc="inputs")
    probs = predict_store(model, store, ckpt, dev, prec, cl, desc="explain")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _output_names([Path(p) for p in store.ids])
    rows = []
    for idx in torch.arange(len(store)).split(CAM_BATCH):
        raw = store.take(idx)
        x = prepare_batch(raw.to(dev), ckpt["input_size"], ckpt["mean"], ckpt["std"], ckpt["in_chans"])
        pred = probs[idx.numpy()].argmax(1)
        explained = pred if target is None else [classes.index(target)] * len(idx)
        cams = grad_cam(model, x, target=torch.as_tensor(explained)).cpu().numpy()
        for j, i in enumerate(idx.tolist()):
            p, c = probs[i], int(explained[j])
            image = raw[j].numpy()
            image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            title = f"{classes[int(pred[j])]} {p[int(pred[j])]:.2f}"
            if target is not None:
                title += f" · Grad-CAM for {target} ({p[c]:.2f})"
            path = out / names[i]
            save_overlay(path, _upscale(image), cams[j], title=title)
            label = int(store.labels[i])
            rows.append({"path": store.ids[i], "label": classes[label] if label >= 0 else "",
                         "prediction": classes[int(pred[j])], "probability": float(p[int(pred[j])]),
                         "explained_class": classes[c], "gradcam": str(path)})
    with open(out / "explain.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "prediction", "probability", "explained_class", "gradcam"])
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
