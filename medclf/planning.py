"""The self-configuring plan: a cheap fingerprint of the data plus a timing probe on this machine.

`fingerprint(source)` reads what the data is (images per class and split, size and aspect
distribution, channels, bit depth, imbalance) from image headers or npz array shapes, without
decoding the data set. `make_plan(...)` turns it into training settings, each with a one-line
reason; the number of epochs is fitted to the time budget from a few timed training steps of the
chosen model at the chosen size on this machine (`probe`). `medclf train` applies the plan to every
setting the user did not set explicitly; `medclf plan` prints and saves it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import models, runtime
from .config import TrainConfig, check_settings, save_yaml
from .data import sources
from .data.augment import FULL_INTENSITY, PRESETS, prepare_batch, training_preset
from .data import dicom
from .data.store import UNREADABLE, probe_channels
from .errors import MedclfError
from .serialize import plain

# settings the plan decides; everything else keeps its TrainConfig default
MIN_VAL_FOR_AUC = 300  # fewer validation images: AUC's standard error (~0.01 at n = 100, AUC 0.98) exceeds epoch-to-epoch gains
PLANNED = ("model", "size", "stem", "augment", "intensity", "batch_size", "lr", "schedule", "warmup_epochs", "epochs",
           "time_budget", "patience", "monitor", "balance", "label_smoothing", "ema", "tta", "folds", "checkpoint")
CV_MAX_IMAGES = 2000  # train+val below this: cross-validate (a single validation split of < 400 images is too noisy)
CV_FOLDS = 5
BEST_EPOCH_MIN_VAL = 2000  # validation images needed before the best epoch, rather than the final one, is kept
DEFAULT_BUDGET = 10.0  # minutes
BUDGET_USE = 0.85  # share of the budget the planned epochs fill (the rest: setup, jitter, final evaluation)
MAX_EPOCHS = 60
HEADER_SAMPLE = 400  # images per split whose headers are read for the size / aspect / mode statistics


# --------------------------------------------------------------------------- fingerprint

def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return {"min": float(a.min()), "p10": float(np.percentile(a, 10)), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max())}


_MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8, "I;16": 16, "I;16B": 16,
              "I;16L": 16, "I": 32, "F": 32}


def fingerprint(source: sources.Source, sample: int = HEADER_SAMPLE) -> dict[str, Any]:
    """What the data is, from headers (folders) or array shapes (npz); no full decode.
    Multi-label data (`task` "multi-label"): counts are each label's positives, the imbalance ratio the largest
    negatives/positives ratio of a label (what BCE's pos_weight corrects)."""
    if source.task == sources.MULTILABEL:
        fp = _multilabel_counts(source)
    else:
        counts = {s: {c: int((sp.labels == i).sum()) for i, c in enumerate(source.classes)}
                  for s, sp in source.splits.items()}
        train = counts.get("train", {})
        present = [n for n in train.values() if n > 0]
        fp = {"counts": counts, "images": {s: int(sum(c.values())) for s, c in counts.items()},
              "imbalance_ratio": round(max(present) / min(present), 3) if present else None}
    fp = {"data": str(source.root), "name": source.name, "kind": source.kind, "classes": list(source.classes),
          "num_classes": len(source.classes), **fp, "generated_splits": dict(source.generated_splits),
          "planned_budget": source.planned_budget}
    if source.kind == "npz":
        archive = source.load_npz()
        split = source.splits.get("train") or next(iter(source.splits.values()))
        array = archive[f"{split.npz_key}_images"]
        h, w = int(array.shape[1]), int(array.shape[2])
        fp.update({"width": _stats([w]), "height": _stats([h]), "short_side": _stats([min(h, w)]),
                   "aspect": _stats([w / h]), "channels": 3 if array.ndim == 4 else 1,
                   "bit_depth": int(array.dtype.itemsize * 8), "modes": {"RGB" if array.ndim == 4 else "L": len(split)},
                   "sampled": len(split)})
        return fp
    widths, heights, modes, formats, unreadable = [], [], {}, {}, 0
    split = source.splits.get("train") or next(iter(source.splits.values()))
    step = max(1, len(split.paths) // sample)
    picked = split.paths[::step][:sample]
    dicom_bits = []
    for p in picked:
        try:
            if dicom.is_dicom(p):
                width, height, mode, depth = dicom.describe(p)
                dicom_bits.append(depth)
                image_format = "DICOM"
            else:
                with Image.open(p) as img:  # lazy: reads the header only
                    (width, height), mode, image_format = img.size, img.mode, img.format or "?"
            widths.append(width)
            heights.append(height)
            modes[mode] = modes.get(mode, 0) + 1
            formats[image_format] = formats.get(image_format, 0) + 1
        except (*UNREADABLE, MedclfError):
            unreadable += 1
    if dicom_bits:
        fp["dicom_mapping"] = dicom.MAPPING  # how those files become 8-bit (dicom.py)
    bits = max([_MODE_BITS.get(m, 8) for m in modes if m in _MODE_BITS] + dicom_bits, default=8)
    fp.update({"width": _stats(widths), "height": _stats(heights),
               "short_side": _stats([min(a, b) for a, b in zip(widths, heights)]),
               "aspect": _stats([a / b for a, b in zip(widths, heights)]),
               # RGB-encoded gray scans are common: channels says whether the pixels hold real colour
               "channels": probe_channels(source, split, sample=min(sample, 100)),
               "bit_depth": bits, "modes": modes, "formats": formats, "sampled": len(picked),
               "unreadable_in_sample": unreadable})
    return fp


def _multilabel_counts(source: sources.Source) -> dict[str, Any]:
    from .tasks import imbalance_ratio

    counts = {s: {c: int(sp.labels[:, j].sum()) for j, c in enumerate(source.classes)} for s, sp in source.splits.items()}
    train = source.splits.get("train")
    ratio = imbalance_ratio(train.labels) if train is not None else None
    return {"task": sources.MULTILABEL, "counts": counts, "images": {s: len(sp) for s, sp in source.splits.items()},
            "imbalance_ratio": round(ratio, 3) if ratio is not None else None}


# --------------------------------------------------------------------------- probe

def probe(arch: str, num_classes: int, channels: int, stem: str, input_size: int, store_size: int, batch_size: int,
          augment: str = "light", device: str | torch.device = "auto", max_seconds: float = 4.0,
          max_steps: int = 3, infer_batch: int = 128, intensity: float = 0.0) -> dict[str, float]:
    """Images per second of a few training steps (augmentation included) and one inference batch.

    One untimed warm-up step, then up to `max_steps` timed steps or `max_seconds`, whichever comes first.
    """
    dev = runtime.pick_device(str(device))
    precision = runtime.pick_precision("auto", dev)
    channels_last = runtime.use_channels_last(None, dev, precision)
    runtime.tune_backend(dev)  # as training runs: the warm-up step below pays for cuDNN's algorithm search
    rng_state = torch.get_rng_state()
    try:
        model = models.build_model(arch, num_classes, channels, stem).to(
            dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=dev.type in ("cpu", "cuda"))
        loss_fn = torch.nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(0)
        # on the device once, as a store that fits there is (placement.py): steps time the GPU's work, not a copy
        x8 = torch.randint(0, 256, (batch_size, channels, store_size, store_size), dtype=torch.uint8, generator=gen).to(dev)
        y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
        norm = [0.5] * channels
        preset = training_preset(augment, intensity)

        def step() -> None:
            x = prepare_batch(x8.to(dev), input_size, norm, norm, channels, preset, gen)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast(dev, precision):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()

        model.train()
        t0 = time.perf_counter()
        step()  # warm-up: allocations, kernel selection
        warm = time.perf_counter() - t0
        times: list[float] = []
        while len(times) < max(1, max_steps) and (not times or sum(times) + min(times) < max_seconds):
            t1 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t1)
        steps = len(times)
        train_s = min(times)  # the fastest step: the steady state, least disturbed by other load
        model.eval()
        xi = torch.randint(0, 256, (min(infer_batch, 2 * batch_size), channels, store_size, store_size), dtype=torch.uint8,
                           generator=gen)
        with torch.inference_mode():
            for _ in range(2 if dev.type == "cuda" else 1):  # CUDA: the first pass selects kernels for the shape
                t0 = time.perf_counter()
                x = prepare_batch(xi.to(dev), input_size, norm, norm, channels)
                with runtime.autocast(dev, precision):
                    model(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                infer_s = time.perf_counter() - t0
    finally:
        torch.set_rng_state(rng_state)
    return {"train_img_per_s": round(batch_size / train_s, 2), "infer_img_per_s": round(len(xi) / infer_s, 2),
            "steps": steps, "batch_size": batch_size, "warmup_s": round(warm, 3),
            "device": runtime.describe(dev, precision, channels_last)}


# --------------------------------------------------------------------------- plan

def _candidates(side: int, base: dict | None) -> list[tuple[str, int, str]]:
    """(stem, input size, why) in order of expected accuracy; the first that fits the budget wins.

    A base model fixes the stem (its first convolution's shape) but not the size: convolutions and the global
    pooling before the head work at any input size, so it is fine-tuned at the size chosen for the data."""
    if base is None:
        return _scratch_candidates(side)
    stem, trained = base["stem"], int(base["input_size"])
    fits = [(s, size, f"the base was trained at {trained} px; ResNet weights are size-agnostic: fine-tuning at {size} px "
                      f"because {why[0].lower()}{why[1:]}") for s, size, why in _scratch_candidates(side) if s == stem]
    inherited = (stem, trained, f"the base's {trained} px ({stem} stem): no size for {side} px images suits its stem")
    return fits or [inherited]


def _scratch_candidates(side: int) -> list[tuple[str, int, str]]:
    """The candidates for training from scratch on images of this side."""
    if side <= 20:
        return [("small", side, f"tiny {side} px images: full resolution through a stride-1 stem; compute is negligible")]
    if side <= 32:
        return [("imagenet", 64, f"{side} px upsampled to 64 px, stride-4 ImageNet stem: upsampled inputs match or beat "
                                 f"native {side} px (MedMNIST v2) at ~1/3 of the small stem's cost per image (measured)"),
                ("small", side, f"{side} px with the stride-1 small stem"),
                ("imagenet", 48, f"{side} px upsampled to 48 px, ImageNet stem: the cheapest size that keeps accuracy")]
    if side <= 80:
        return [("imagenet", side, f"native {side} px with the ImageNet stem"),
                ("imagenet", 48, "48 px, ImageNet stem: cheaper, enough for coarse anatomy / modality cues"),
                ("imagenet", 32, "32 px, ImageNet stem: the cheapest that still trains well")]
    return [("imagenet", s, f"{s} px (images are {side} px): the largest size whose epochs fit the budget")
            for s in (224, 160, 128, 96, 64) if s <= max(side, 64)]


def candidate_stems(side: int) -> dict[int, str]:
    """The input sizes the plan weighs for training from scratch on images of this side, each with its stem
    (`medclf tune` searches among them)."""
    return {size: stem for stem, size, _ in _scratch_candidates(min(side, 512))}


def _cost(stem: str, size: int) -> float:
    """Relative compute per image: pixels reaching layer1 (the stride-4 ImageNet stem divides each side by 4)."""
    return float(size * size if stem == "small" else (size / 4) ** 2)


def min_epochs(n_train: int) -> int:
    """Epochs a model needs at least to converge: about 40k images seen, 3 to 15 epochs."""
    return int(min(15, max(3, math.ceil(40_000 / max(1, n_train)))))


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: one per batch, except a trailing 1-image batch, which is dropped
    (BatchNorm cannot train on a single image). The training loop and every schedule use this count."""
    assert n_images >= 0 and batch_size >= 1
    batches = math.ceil(n_images / batch_size)
    if batches > 1 and n_images % batch_size == 1:
        batches -= 1
    return max(1, batches)


IMBALANCE_TO_WEIGHT = 1.5  # largest / smallest class above this: class-weighted loss


def balance_for(imbalance_ratio: float | None) -> str:
    """The class-imbalance rule, shared by the plan and training's `--balance auto`."""
    return "weight" if (imbalance_ratio or 1.0) > IMBALANCE_TO_WEIGHT else "none"


GRAY_INTENSITY = 0.5  # strength of intensity augmentation for grayscale scans


def intensity_for(channels: int) -> tuple[float, str]:
    """Intensity augmentation by modality: grayscale scans (radiographs, CT, MRI, ultrasound) vary in exposure,
    windowing, gain and noise between scanners; in colour images (dermoscopy, histology, fundus) colour and
    brightness carry the finding, so they are left alone."""
    if channels == 1:
        spread = FULL_INTENSITY["brightness"] * GRAY_INTENSITY
        return GRAY_INTENSITY, (f"{GRAY_INTENSITY:g}: grayscale scans vary in exposure, contrast, sharpness and noise "
                                f"between scanners (brightness/contrast/gamma ±{spread:.0%}, blur, noise)")
    return 0.0, "off: in colour images colour and brightness can be the finding"


def _batch_size(n_train: int) -> int:
    if n_train >= 20_000:
        return 128
    if n_train >= 2_000:
        return 64
    if n_train >= 300:
        return 32
    return 16


class _Prober:
    """Timing probes of (stem, size) candidates on this machine, each measured once per plan."""

    def __init__(self, settings: dict, k: int, channels: int, store_size: int | None, device: str,
                 seconds: float, do_probe: bool):
        self.settings, self.k, self.channels, self.store_size = settings, k, channels, store_size
        self.device, self.seconds, self.do_probe = device, seconds, do_probe
        self.cache: dict[tuple[str, str, int], dict] = {}
        self.results: list[dict] = []  # the probes of the last search, for the plan's record

    def __call__(self, stem: str, size: int, model: str | None = None) -> dict:
        model = model or self.settings["model"]
        if (model, stem, size) not in self.cache:
            self.cache[model, stem, size] = probe(model, self.k, self.channels, stem, size,
                                                  self.store_size or size, int(self.settings["batch_size"]),
                                                  self.settings["augment"], self.device, max_seconds=self.seconds,
                                                  max_steps=3)
        return self.cache[model, stem, size]


def _probe_row(stem: str, size: int, measured: dict, n_train: int, n_val: int, budget: float) -> dict[str, Any]:
    """A probe with the epoch time it implies for n_train + n_val images and the epochs that fit `budget` minutes."""
    epoch_s = n_train / measured["train_img_per_s"] + n_val / measured["infer_img_per_s"]
    fit = int(BUDGET_USE * budget * 60 // epoch_s)
    return {"stem": stem, "size": size, **measured, "epoch_s": round(epoch_s, 1), "epochs_in_budget": fit}


LARGE_TRAIN = 20_000  # training images from which the size must fit SIZE_HEADROOM times the minimum epochs
SIZE_HEADROOM = 2  # (see size_epochs)


def size_epochs(n_train: int) -> tuple[int, str]:
    """Epochs the chosen input size must fit in the budget, and why. Large data trains for its minimum of 3
    epochs when validation saturates early (thousands of validation images, often an easy task such as the
    modality of a scan): a size chosen to fit only that minimum would make such a run last most of the budget.
    Fitting SIZE_HEADROOM times the minimum ends a saturated run within about half the budget, and gives a
    hard one at least that many times its minimum epochs, rather than the bare minimum at a larger size."""
    needed = min_epochs(n_train)
    if n_train < LARGE_TRAIN:
        return needed, ""
    return SIZE_HEADROOM * needed, (f"{n_train} training images (≥ {LARGE_TRAIN}): the size must fit "
                                    f"{SIZE_HEADROOM}× the {needed} minimum epochs, so a run whose validation "
                                    f"saturates ends within about half the budget")


def _choose_size(cands: list[tuple[str, int, str]], measure: _Prober, n_train: int, n_val: int,
                 budget: float, needed: int | None = None) -> dict[str, Any]:
    """The first candidate of which `needed` epochs (default: `min_epochs`) fit `budget` minutes for one model
    trained on n_train images and validated on n_val; else the cheapest. Returns {"chosen": (stem, size, why,
    probe or None), "fits", "why_not", "probes"}."""
    if not measure.do_probe:  # nothing to fit: no probe, so fixed-epoch runs (and tests) start at once
        return {"chosen": (*cands[0], None), "fits": True, "why_not": "", "probes": []}
    needed = needed or min_epochs(n_train)
    too_slow = math.inf  # cost of the cheapest candidate measured not to fit
    probes: list[dict[str, Any]] = []
    for stem, size, why in cands:
        if _cost(stem, size) >= too_slow:
            continue  # at least as expensive as one that did not fit: no need to time it
        probes.append(_probe_row(stem, size, measure(stem, size), n_train, n_val, budget))
        if probes[-1]["epochs_in_budget"] >= needed:
            measure.results = probes
            return {"chosen": (stem, size, why, probes[-1]), "fits": True, "why_not": "", "probes": probes}
        too_slow = min(too_slow, _cost(stem, size))
    best = min(range(len(probes)), key=lambda i: probes[i]["epoch_s"])
    stem, size = probes[best]["stem"], probes[best]["size"]
    why = next(c[2] for c in cands if c[:2] == (stem, size))
    why_not = f"{probes[best]['epochs_in_budget']} epoch(s) of {needed} needed at {size} px"
    measure.results = probes
    return {"chosen": (stem, size, why + f" (the cheapest candidate; none fits {needed} epochs in {budget:.3g} min)",
                       probes[best]), "fits": False, "why_not": why_not, "probes": probes}


DEEPER_MODELS = ("resnet50", "resnet34")  # deepest first: the first whose epochs fit with headroom wins
DEEPER_MIN_TRAIN = 20_000  # training images from which depth pays (ChestX-ray14/CheXpert baselines are ResNet-50 class)
DEEPER_HEADROOM = 2  # a deeper model must fit this many times the minimum epochs: depth never costs convergence


def _deeper_model(measure: _Prober, cands: list[tuple[str, int, str]], search: dict, n_train: int, n_val: int,
                  budget: float) -> tuple[str, str, dict] | None:
    """(model, why, its probe row) for a ResNet deeper than the default, by the rule the size follows: where the
    most accurate size already fits and the data is large, the deepest model whose epochs still fit
    DEEPER_HEADROOM times the minimum. None where ResNet-18 stays (a slow device, a small set, no probe)."""
    stem, size, _, measured = search["chosen"]
    if measured is None or not search["fits"] or (stem, size) != cands[0][:2] or n_train < DEEPER_MIN_TRAIN:
        return None
    need = DEEPER_HEADROOM * min_epochs(n_train)
    for model in DEEPER_MODELS:
        try:
            measured = measure(stem, size, model)
        except torch.OutOfMemoryError:  # the deeper model's activations exceed the GPU at this batch: not a fit
            measured = None
        if measured is None:
            torch.cuda.empty_cache()  # here, not in the handler: its traceback still held the probe's tensors
            continue
        row = {"model": model, **_probe_row(stem, size, measured, n_train, n_val, budget)}
        measure.results.append(row)
        if row["epochs_in_budget"] >= need:
            return model, (f"{model}: {n_train} training images, and this device fits {row['epochs_in_budget']} of its "
                           f"epochs at the most accurate size ({size} px), ≥ {need} ({DEEPER_HEADROOM}× the minimum): "
                           f"depth pays on large sets"), row
    return None


def _checkpoint_rule(folds: int, n_val: int) -> tuple[str, str]:
    """Keep the final weights unless validation is large enough for its best epoch to be signal, not noise."""
    if folds >= 2:
        return "final", ("final weights of each fold's completed schedule: its held-out fold selects nothing, so the "
                         "out-of-fold estimate stays honest")
    half_width = 1.96 * math.sqrt(0.9 * 0.1 / max(1, n_val))  # 95% CI half-width of an accuracy near 0.9
    if n_val >= BEST_EPOCH_MIN_VAL:
        return "best", (f"best validation epoch: {n_val} validation images (≥ {BEST_EPOCH_MIN_VAL}) rank epochs to "
                        f"±{half_width:.3f} accuracy: enough to tell epochs apart (if validation saturates, epochs differ by a "
                        f"few images and the final annealed weights are kept)")
    return "final", (f"final weights of the completed schedule: {n_val} validation images rank epochs only to "
                     f"±{half_width:.3f} accuracy (95%): smaller differences between epochs are noise, and the best "
                     f"epoch would be chosen by it (< {BEST_EPOCH_MIN_VAL} images; nnU-Net keeps the final checkpoint too)")


def make_plan(fp: dict[str, Any], time_budget: float | None = None, base: dict | None = None,
              fixed: dict[str, Any] | None = None, device: str = "auto", do_probe: bool = True,
              probe_seconds: float = 8.0, world_size: int = 1) -> dict[str, Any]:
    """Settings with reasons. `fixed`: settings the user chose (they win and skip the matching decisions).
    `world_size`: processes training together (torchrun): batch_size is each one's, the learning rate follows
    the global batch, and the budget is each process's, fitted to its 1/world_size share of every epoch."""
    fixed = dict(fixed or {})
    budget = float(fixed.get("time_budget") or time_budget or fp.get("planned_budget") or DEFAULT_BUDGET)
    n_train = int(fp["images"].get("train", 0))
    n_val = int(fp["images"].get("val", max(1, n_train // 10)))
    k = int(fp["num_classes"])
    side = int(round(fp["short_side"]["median"])) if fp.get("short_side") else 224
    side = min(side, 512)
    channels = int(base["in_chans"]) if base else int(fixed.get("channels") or fp.get("channels") or 1)
    settings: dict[str, Any] = {}
    reasons: dict[str, str] = {}

    def decide(name: str, value: Any, why: str) -> None:
        if name in fixed:
            settings[name], reasons[name] = fixed[name], "set by you"
        else:
            settings[name], reasons[name] = value, why

    finetune = base is not None or fixed.get("weights", "none") not in ("none", None)
    decide("model", base["arch"] if base else "resnet18",
           "architecture of the base model" if base else
           "ResNet-18: the accuracy/compute sweet spot for small medical sets (34/50 rarely pay on CPU budgets)")
    default_why = ("the sample's own short budget" if fp.get("planned_budget") and not time_budget else "default")
    decide("time_budget", budget, f"{budget:g} min {default_why}; the schedule is finished early to end there")
    decide("batch_size", _batch_size(n_train), f"{n_train} training images: enough optimizer steps per epoch "
                                               f"and an efficient batch"
                                               + (f", per process ({world_size} processes)" if world_size > 1 else ""))
    global_batch = settings["batch_size"] * world_size
    imbalance = fp.get("imbalance_ratio") or 1.0
    balance = balance_for(imbalance)
    decide("balance", balance,
           f"classes differ {imbalance:.2f}x: class-weighted loss keeps the minority recall up"
           if balance == "weight"
           else f"classes are balanced ({imbalance:.2f}x): plain loss")
    decide("label_smoothing", 0.1, "0.1: calibrates and regularises; standard for ResNet training")
    small = n_train < 1000
    augment = "strong" if small and not finetune else "light"
    decide("augment", augment,
           (f"only {n_train} training images: strong augmentation (TrivialAugment, erasing) against overfitting"
            if augment == "strong" else "light (flip, resized crop ±25% area, ±10°): geometry a scan plausibly varies by")
           + f"; inference sees the centre {PRESETS[augment].eval_crop:.0%} of each side, the mean training crop")
    decide("intensity", *intensity_for(channels))
    decide("lr", 5e-4 if finetune else 1e-3 * math.sqrt(global_batch / 64),
           "5e-4: fine-tuning keeps the pretrained features" if finetune else
           "AdamW 1e-3 at batch 64, square-root scaled with the batch" + (
               f" (the global batch: {settings['batch_size']} × {world_size} processes = {global_batch})"
               if world_size > 1 else ""))
    decide("schedule", "cosine", "cosine decay sized to the planned epochs; early stopping, saturated validation or a "
                                 "binding budget bring its end forward, so it always anneals to 0")
    if k == 2 and n_val >= MIN_VAL_FOR_AUC:
        decide("monitor", "auc", f"ROC AUC: threshold-free, robust to imbalance; {n_val} validation images pin it down")
    elif k == 2:
        # measured on chest_xray_400 (100 val images), 6 runs each: argmax accuracy of the chosen checkpoint
        # 0.905 (fine-tuned) / 0.877 (scratch) picking by AUC, 0.937 / 0.910 picking by loss
        decide("monitor", "loss", f"validation loss: with {n_val} validation images the best-AUC epoch is mostly "
                                  "noise and ignores calibration; cross-entropy scores every image's probability")
    else:
        decide("monitor", "loss", "validation loss: continuous, so near-perfect accuracy/AUC ties do not freeze "
                                  "the checkpoint")
    multilabel = fp.get("task") == sources.MULTILABEL
    if multilabel:
        _multilabel_decisions(decide, balance, imbalance, n_val)
    decide("tta", False, "off: `medclf evaluate/predict` run without TTA unless asked, so the run's metrics match them "
                         "(flip TTA on val, 3 seeds: PneumoniaMNIST accuracy -0.002 to -0.004, chest_xray_400 AUC -0.011 to +0.002: "
                         "no consistent gain)")

    # resolution and stem: the most accurate candidate whose epochs fit the budget; cross-validation first
    # where the data is small, when K models still fit the budget
    if base is not None and "size" in fixed:
        cands = [(base["stem"], int(fixed["size"]), "set by you")]
    elif base is not None:
        cands = _candidates(side, base)
    elif "size" in fixed or "stem" in fixed:
        size = int(fixed.get("size") or side)
        stem = models.resolve_stem(fixed.get("stem", "auto"), size)
        cands = [(stem, size, "set by you")]
    else:
        cands = _candidates(side, None)
    n_total = n_train + n_val
    store_size = side if fp["kind"] == "npz" else None
    measure = _Prober(settings, k, channels, store_size, device, probe_seconds,
                      do_probe=do_probe and "epochs" not in fixed)
    models_trained = 1 + bool(fixed.get("refit"))
    folds = int(fixed.get("folds", 0))
    counts = fp.get("counts")  # absent: nothing known about the classes, so nothing rules the folds out
    smallest = (min((sum(counts.get(s, {}).get(c, 0) for s in ("train", "val")) for c in fp["classes"]), default=0)
                if counts else CV_FOLDS)
    if multilabel:
        decide("folds", 0, "multi-label: cross-validation folds are stratified by class, which a multi-label task "
                           "lacks; one model, validated on the val split")
    elif world_size > 1 and "folds" not in fixed:
        decide("folds", 0, f"{world_size} processes train one model together; cross-validation trains its models "
                           "one after another in one process")
    elif "folds" not in fixed and n_total < CV_MAX_IMAGES and smallest < CV_FOLDS:
        decide("folds", 0, f"{n_total} images would favour cross-validation, but the smallest class has {smallest} "
                           f"image(s), fewer than {CV_FOLDS} folds: one model, validated on the val split")
    elif "folds" not in fixed and n_total < CV_MAX_IMAGES:
        trial = _choose_size(cands, measure, n_total * (CV_FOLDS - 1) // CV_FOLDS, n_total // CV_FOLDS,
                             budget / (CV_FOLDS + bool(fixed.get("refit"))))
        if trial["fits"] or not measure.do_probe:
            folds = CV_FOLDS
        cv_note = (f"{n_total} train+val images (< {CV_MAX_IMAGES}): {CV_FOLDS}-fold cross-validation gives an "
                   f"out-of-fold estimate on every image and an ensemble of {CV_FOLDS} models"
                   if folds else f"{n_total} images would favour cross-validation, but {CV_FOLDS} models do not fit "
                                 f"{budget:g} min ({trial['why_not']}): one model, validated on the val split")
        decide("folds", folds, cv_note)
    else:
        decide("folds", folds, f"{n_total} train+val images: one validation split is large enough" if folds == 0
               else "")
    folds = int(settings["folds"])
    if folds >= 2:
        models_trained = folds + bool(fixed.get("refit"))
        fold_train, fold_val = n_total * (folds - 1) // folds, n_total // folds
    else:
        fold_train, fold_val = n_train, n_val
    # each of world_size processes trains and validates 1/world_size of every epoch: as if the budget were that larger
    model_budget = budget / models_trained * world_size
    needed, headroom_why = size_epochs(fold_train)
    search = _choose_size(cands, measure, fold_train, fold_val, model_budget, needed)
    stem, size, why, measured = search["chosen"]
    if headroom_why and any(row["epochs_in_budget"] >= min_epochs(fold_train) for row in search["probes"]
                            if (row["stem"], row["size"]) != (stem, size)):
        why += f"; {headroom_why}"  # a more accurate size fitted the minimum, not the headroom
    deeper = (_deeper_model(measure, cands, search, fold_train, fold_val, model_budget)
              if not finetune and "model" not in fixed else None)
    if deeper is not None:  # a fast device with budget to spare: the same fit, one rung up in depth
        measured = deeper[2]
        decide("model", deeper[0], deeper[1])
    if base is None:
        decide("size", size, why)
        decide("stem", stem, f"{stem} stem for {size} px inputs" + ("" if stem == "imagenet" else " (keeps full resolution)"))
    else:
        settings["size"], reasons["size"] = size, why
        settings["stem"], reasons["stem"] = stem, "inherited from the base model"
    per_model = f" (the budget split over {models_trained} models)" if models_trained > 1 else ""
    if world_size > 1:
        per_model += f" (each of {world_size} processes trains 1/{world_size} of every epoch in that time)"
    if "epochs" in fixed:
        decide("epochs", fixed["epochs"], "")
        reasons["epochs"] = "set by you (so no timing probe)"
    elif measured is not None:
        fit = measured["epochs_in_budget"]
        cap = MAX_EPOCHS if fold_train >= 1000 else 100
        epochs = max(1, min(cap, fit))
        decide("epochs", epochs, f"{measured['train_img_per_s']:.0f} img/s measured here → {measured['epoch_s']:.0f} s per "
                                 f"epoch; {BUDGET_USE:.0%} of {budget / models_trained:.3g} min{per_model} fits {fit}"
                                 + (f", capped at {cap}" if fit > cap else ""))
    else:
        decide("epochs", TrainConfig().epochs, "no timing probe: the default")
    epochs = int(settings["epochs"])
    decide("warmup_epochs", round(min(1.0, max(0.2, 0.1 * epochs)), 2), "linear warm-up over ~10% of training (≤ 1 epoch)")
    if folds >= 2:
        decide("patience", 0, "off: every fold trains its whole schedule, so its held-out fold chooses nothing")
    else:
        decide("patience", 0 if epochs <= 10 else max(5, epochs // 3),
               "off: a short cosine schedule peaks at its end" if epochs <= 10
               else "a third of the schedule without validation gain brings the schedule to an early end")
    decide("checkpoint", *_checkpoint_rule(folds, fold_val))
    steps = epochs * steps_per_epoch(fold_train // world_size, int(settings["batch_size"]))
    use_ema = steps >= 1500
    decay = round(min(0.999, 1 - 20 / steps), 4) if use_ema else 0.0
    decide("ema", decay, f"EMA of the weights over ~{int(1 / (1 - decay)) if use_ema else 0} of {steps} steps: a smoother, "
                         "better-generalising checkpoint" if use_ema else f"off: {steps} steps are too few to average over")
    probes = measure.results
    needed = min_epochs(fold_train)
    settings = {name: settings[name] for name in PLANNED}
    reasons = {name: reasons[name] for name in PLANNED}
    return {"settings": settings, "reasons": reasons, "probe": probes, "min_epochs": needed,
            "time_budget": budget, "data": fp.get("data"),
            "splits": dict(fp.get("generated_splits") or {})}  # how medclf made splits the data lacks, and why


def _multilabel_decisions(decide, balance: str, imbalance: float, n_val: int) -> None:
    """Where a multi-label plan differs: BCE's pos_weight, hard 0/1 targets, macro AUC on a large enough val."""
    decide("balance", balance,
           f"a label's negatives outnumber its positives up to {imbalance:.2f}x: BCE pos_weight (negatives/positives "
           "per label) keeps rare findings' sensitivity up" if balance == "weight"
           else f"labels are balanced ({imbalance:.2f}x negatives/positives at most): plain BCE")
    decide("label_smoothing", 0.0, "multi-label: 0/1 targets; smoothing would pull every label's probability towards "
                                   "0.5 and move the per-label thresholds chosen on validation")
    if n_val >= MIN_VAL_FOR_AUC:
        decide("monitor", "auc", f"macro ROC AUC over the labels: threshold-free; {n_val} validation images pin it down")
    else:
        decide("monitor", "loss", f"validation BCE: with {n_val} validation images macro AUC is noisy per epoch; the "
                                  "loss scores every label's probability")


def format_plan(plan: dict[str, Any], fp: dict[str, Any]) -> str:
    what = "labels, multi-label" if fp.get("task") == sources.MULTILABEL else "classes"
    lines = [f"data: {fp['data']} ({fp['kind']}, {fp['num_classes']} {what}, "
             + ", ".join(f"{s} {n}" for s, n in fp["images"].items()) + ")"]
    side = fp.get("short_side") or {}
    lines.append(f"images: short side median {side.get('median', '?'):g} px "
                 f"(p10 {side.get('p10', 0):g}, p90 {side.get('p90', 0):g}), aspect median "
                 f"{(fp.get('aspect') or {}).get('median', 1):.2f}, {fp['channels']} channel(s), {fp['bit_depth']}-bit, "
                 f"imbalance {fp['imbalance_ratio']}x")
    for p in plan["probe"]:
        lines.append(f"probe: {p['model'] + ', ' if 'model' in p else ''}{p['stem']} stem {p['size']} px: {p['train_img_per_s']:.0f} img/s train, "
                     f"{p['infer_img_per_s']:.0f} img/s inference → {p['epoch_s']:.0f} s/epoch, {p['epochs_in_budget']} "
                     f"epoch(s) in budget")
    for split, how in plan.get("splits", {}).items():
        lines.append(f"split {split}: {how}")
    width = max(len(k) for k in plan["settings"])
    for name, value in plan["settings"].items():
        lines.append(f"  {name:<{width}}  {str(value):<8}  {plan['reasons'][name]}")
    return "\n".join(lines)


def plan(data: str, time_budget: float | None = None, out: str | None = None, weights: str = "none",
         device: str = "auto", seed: int = 0, do_probe: bool = True, verbose: bool = True, **fixed: Any) -> dict[str, Any]:
    """Fingerprint DATA and plan its training; `out` saves the plan as YAML. Same as `medclf plan`."""
    check_settings(time_budget=time_budget, seed=seed, **fixed)
    options = sources.data_options(fixed)
    fixed = {k: v for k, v in fixed.items() if k not in sources.DATA_OPTIONS}
    source = sources.open_source(data, seed=seed, **options)
    if "train" not in source.splits:
        raise MedclfError(f"{data} has no train split")
    sources.ensure_val_split(source, TrainConfig().val_fraction, seed)
    base = models.read_base(weights) if weights not in ("none", "imagenet", None) else None
    fp = fingerprint(source)
    fixed = {k: v for k, v in fixed.items() if v is not None}
    if weights not in ("none", None):
        fixed["weights"] = weights
    result = make_plan(fp, time_budget, base, fixed, device, do_probe)
    result["fingerprint"] = fp
    if verbose:
        print(format_plan(result, fp))
    if out:
        save_plan(result, out)
        if verbose:
            print(f"plan → {out}")
    return result


def save_plan(result: dict[str, Any], path: str | Path) -> None:
    data = {k: v for k, v in result.items() if k != "fingerprint"}
    save_yaml(plain(data), path)


__all__ = ["fingerprint", "probe", "make_plan", "plan", "format_plan", "save_plan", "PLANNED", "steps_per_epoch",
           "balance_for"]
