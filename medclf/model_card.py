"""model_card.md for a run: the document that travels with the model.

Follows the sections of Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019) and fills the items of
the CLAIM checklist (Mongan et al., Radiology: AI 2020) that a tool can know: data source and counts, splits,
preprocessing, model and training settings, metrics with confidence intervals, the operating point, and
how to reproduce the run. Every number is read from the run's files (metrics.json above all), never
recomputed, so the card and metrics.json cannot disagree; `headline_intervals` is what training adds to
metrics.json for the card's confidence intervals.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .config import load_yaml
from .metrics import FEW_ERRORS, METHOD_VAL_SELECTED

CARD = "model_card.md"
HEADLINE = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc": "ROC AUC", "f1_macro": "macro F1"}
# multi-label runs (metrics.MULTILABEL_HEADLINE): threshold-free ranking metrics first
MULTILABEL_HEADLINE = {"auc": "macro ROC AUC", "auc_micro": "micro ROC AUC",
                       "average_precision_macro": "macro average precision",
                       "accuracy": "label accuracy (mean over labels, each at its threshold)"}
SPLIT_WORDS = {"val": "validation", "test": "test", "oof": "out-of-fold (cross-validation)"}
SMALL_SPLIT = 200  # images: below this a split's 95% intervals are wide (metrics.SMALL_ESTIMATE_N says the same)
SETTINGS = ("model", "weights", "finetune", "size", "channels", "stem", "epochs", "batch_size", "lr", "weight_decay",
            "optimizer", "schedule", "warmup_epochs", "label_smoothing", "grad_clip", "patience", "monitor",
            "checkpoint", "augment", "intensity", "balance", "ema", "tta", "folds", "refit", "seed", "time_budget",
            "device", "precision", "world_size")  # world_size: processes that trained it together (torchrun)


def headline_intervals(labels: np.ndarray, probs: np.ndarray, classes: list[str], thresholds=None,
                       n_boot: int = 1000, seed: int = 0) -> dict:
    """{"ci95": {metric: [low, high] or None}, "ece": top-label calibration error} for one split's predictions:
    the intervals report.html uses (`metrics.headline_ci`), stored in metrics.json so the model card can quote it.
    Multi-label labels (N×L): the MULTILABEL_HEADLINE metrics at the per-label `thresholds`; no ECE."""
    from .metrics import headline_ci, metric_functions, multilabel_functions
    from .stats import expected_calibration_error

    multilabel = np.ndim(labels) == 2
    funcs = multilabel_functions(classes, thresholds) if multilabel else metric_functions(classes)
    cis = {}
    for name in (MULTILABEL_HEADLINE if multilabel else HEADLINE):
        low, high = headline_ci(name, funcs[name], labels, probs, n_boot=n_boot, seed=seed)
        cis[name] = [low, high] if np.isfinite(low) and np.isfinite(high) else None
    ece = expected_calibration_error(labels, probs) if len(labels) and not multilabel else None
    return {"ci95": cis, "ece": ece}


def headline_of(entry: dict) -> dict[str, str]:
    """The headline metrics (name → words) of a metrics.json split or estimate entry: multi-label or not."""
    multilabel = entry.get("task") == "multi-label" or "per_label" in entry or "auc_micro" in entry
    return MULTILABEL_HEADLINE if multilabel else HEADLINE


def write_model_card(run: str | Path) -> Path:
    """Write RUN/model_card.md from the run's metrics.json, config.yaml, plan.yaml, fingerprint.json, splits.csv,
    model.pt (preprocessing) and doctor.json when present; returns its path."""
    run = Path(run)
    path = run / CARD
    atomic.write_text(path, model_card_text(run))
    return path


INTENDED_USE = ("Research and education: sorting images like the training data's into its classes. Not a "
                "medical device: not validated for diagnosis; any clinical reading stays with a clinician.")


def card_headline(run: Path | None) -> dict:
    """What a page or API shows next to predictions: the intended use and metrics.json's headline numbers."""
    metrics = _json(run / "metrics.json") if run is not None else {}
    est = metrics.get("estimate") or {}
    splits = {split: {"n": metrics[split].get("n"), **{m: metrics[split].get(m) for m in headline_of(metrics[split])}}
              for split in ("val", "oof", "test") if split in metrics}
    return {"intended_use": INTENDED_USE, "card": str(run / CARD) if run is not None and (run / CARD).is_file() else None,
            "estimate": {"method": est.get("method"), "n": est.get("n"),
                         **{m: est[m] for m in headline_of(est) if m in est}} if est else None,
            "splits": splits, "warnings": est.get("warnings", [])}


def model_card_text(run: Path) -> str:
    metrics = _json(run / "metrics.json")
    config = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    plan = load_yaml(run / "plan.yaml") if (run / "plan.yaml").is_file() else {}
    fingerprint = _json(run / "fingerprint.json")
    ckpt = _checkpoint_spec(run)
    classes = ckpt.get("classes") or fingerprint.get("classes") or []
    parts = [
        _header(run, config, ckpt, fingerprint),
        _model_details(config, ckpt, classes),
        _intended_use(classes, fingerprint),
        _factors(fingerprint, run),
        _metrics_section(metrics),
        _training_data(run, config, fingerprint, classes),
        _evaluation_data(metrics, fingerprint),
        _preprocessing(config, ckpt),
        _training_settings(config, plan),
        _quantitative(metrics, classes),
        _ethics(),
        _caveats(metrics, fingerprint),
        _reproduce(run, config),
    ]
    return "\n".join(parts)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _checkpoint_spec(run: Path) -> dict[str, Any]:
    """The model's own description (classes, input size, mean/std, crop), without its weights."""
    if not (run / "model.pt").is_file():
        return {}
    from .models import read_checkpoint

    ckpt = read_checkpoint(run / "model.pt")
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "config")}


def fmt(value: Any, digits: int = 4) -> str:
    """A metric as the card prints it (the test reads it back with the same rounding)."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}f}"


def _ci(ci: list | None) -> str:
    return "n/a" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _cell(text: Any) -> str:
    """Free text (class names, paths) inside a Markdown table cell: no pipes, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _header(run: Path, config: dict, ckpt: dict, fingerprint: dict) -> str:
    from . import __version__

    name = fingerprint.get("name") or Path(str(config.get("data", "data"))).name
    arch = ckpt.get("arch") or config.get("model", "?")
    return (f"# Model card: {name} classifier ({arch})\n\n"
            f"Written by medclf {__version__} on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the files of "
            f"the run `{run}`. Every number below is copied from its `metrics.json`. Structure: Mitchell et al., "
            f"\"Model Cards for Model Reporting\" (2019), with the CLAIM checklist items a tool can fill in.\n")


def _model_details(config: dict, ckpt: dict, classes: list[str]) -> str:
    from . import __version__

    ensemble = ckpt.get("ensemble")
    kind = (f"an ensemble of {ensemble} cross-validation fold models (their probabilities averaged)" if ensemble
            else "a single network")
    weights = config.get("weights") or "none"
    start = "random initialisation" if weights in ("none", None) else f"weights `{weights}`"
    rows = [["architecture", f"{ckpt.get('arch', config.get('model', '?'))}, {ckpt.get('stem', '?')} stem; {kind}"],
            ["task", f"single-label classification into {len(classes)} classes"],
            ["classes (output order)", ", ".join(f"`{c}`" for c in classes)],
            ["initialisation", f"{start}, fine-tuning: {config.get('finetune', 'full')}"],
            ["input", f"{ckpt.get('input_size', '?')} px, {ckpt.get('in_chans', '?')} channel(s)"],
            ["software", f"medclf {__version__}, PyTorch / torchvision"],
            ["file", "`model.pt` (a plain dict: loads with `torch.load(..., weights_only=True)`)"]]
    return "## Model details\n\n" + _table(["", ""], rows)


def _intended_use(classes: list[str], fingerprint: dict) -> str:
    source = fingerprint.get("name") or "the training data"
    return (
        "## Intended use\n\n"
        f"- **Primary use**: research and education: sorting images like those of `{source}` into "
        f"{', '.join(f'`{c}`' for c in classes)}, to study how well a classifier can do on this data and what it "
        "looks at (Grad-CAM).\n"
        "- **Users**: researchers and engineers who can judge the metrics below; any clinical reading stays with "
        "a qualified clinician.\n"
        "- **Out of scope**: diagnosis or triage of patients without a clinician; images from other sites, "
        "scanners, protocols, populations or modalities than the training data; classes not in the list above "
        "(the model always answers with one of its classes, even for an unrelated image); any use as a medical "
        "device: this model has not been validated or approved for clinical use.\n")


def _factors(fingerprint: dict, run: Path) -> str:
    groups = split_groups(run)
    if groups:
        per_split = ", ".join(f"{split} {len(g)}" for split, g in groups.items())
        grouping = (f"images were grouped by patient/study ({sum(len(g) for g in groups.values())} groups: "
                    f"{per_split}); a group's images all stay in one split.")
    else:
        grouping = ("medclf was given no patient or study identifiers for this data, so it could not keep one "
                    "patient's images out of both training and evaluation: if patients have several images, the "
                    "metrics may be optimistic.")
    return ("## Factors\n\n"
            "- **Relevant factors** that can change performance and that medclf does not know: patient age and sex, "
            "disease severity, acquisition device and site, view/projection, image post-processing.\n"
            "- **Evaluation factors**: the only factor evaluated separately is the class (sensitivity and "
            "specificity per class below).\n"
            f"- **Groups**: {grouping}\n")


def split_groups(run: Path) -> dict[str, set[str]]:
    """The patients/studies of each split, from splits.csv's group column (empty where none were known)."""
    path = run / "splits.csv"
    groups: dict[str, set[str]] = {}
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("group"):
                    groups.setdefault(row["split"], set()).add(row["group"])
    return groups


def _metrics_section(metrics: dict) -> str:
    threshold = _threshold(metrics)
    point = ("the predicted class is the one with the highest probability" if threshold is None else
             f"the positive class is predicted when its probability reaches {fmt(threshold['value'])}, chosen on "
             f"{threshold.get('chosen_on', 'validation')}")
    return ("## Metrics\n\n"
            "- Accuracy, balanced accuracy (mean recall over classes), ROC AUC (one-vs-rest, macro for more than "
            "two classes), macro F1; per class: sensitivity (recall), specificity, precision.\n"
            "- Uncertainty: 95% confidence intervals: Wilson for accuracy (a proportion of images), else the "
            "percentile bootstrap (1000 resamples of the images); where a metric is perfect on a split (AUC: classes "
            "fully separated), whose resamples are then all perfect, the lower end comes from each class's Wilson "
            f"bound for zero errors (with 1 to {FEW_ERRORS - 1} wrong images, the lower end goes no higher than that "
            "bound for the errors seen).\n"
            "- Calibration: top-label expected calibration error (ECE, 15 equal-width bins).\n"
            f"- Operating point: {point}.\n")


def _threshold(metrics: dict) -> dict | None:
    for split in ("val", "oof", "test"):
        threshold = metrics.get(split, {}).get("threshold")
        if isinstance(threshold, dict) and threshold.get("value") is not None:
            return threshold
    return None


def split_counts(run: Path, fingerprint: dict) -> dict[str, Counter]:
    """Images per split and class: splits.csv (what the run trained on), else the data's fingerprint."""
    counts: dict[str, Counter] = {}
    path = run / "splits.csv"
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                counts.setdefault(row["split"], Counter())[row["label"]] += 1
        return counts
    return {split: Counter(c) for split, c in (fingerprint.get("counts") or {}).items()}


def _training_data(run: Path, config: dict, fingerprint: dict, classes: list[str]) -> str:
    counts = split_counts(run, fingerprint)
    text = (f"## Training data\n\n- **Source**: `{config.get('data', fingerprint.get('data', '?'))}` "
            f"({fingerprint.get('kind', '?')})\n")
    for split, how in (fingerprint.get("generated_splits") or {}).items():
        text += f"- **{split}** split made by medclf: {how}\n"
    if (run / "skipped.txt").is_file():
        text += f"- {len((run / 'skipped.txt').read_text().split())} unreadable image(s) were skipped (skipped.txt)\n"
    if counts:
        names = list(counts)
        rows = [[f"`{c}`"] + [counts[s][c] for s in names] + [sum(counts[s][c] for s in names)] for c in classes]
        rows.append(["all"] + [sum(counts[s].values()) for s in names] + [sum(sum(v.values()) for v in counts.values())])
        text += "\nImages per class and split:\n\n" + _table(["class", *names, "total"], rows)
    return text + _doctor(run)


DOCTOR_FINDINGS = {"cross_split_duplicates": "image(s) duplicated across splits (leakage)",
                   "group_overlap": "patient(s)/group(s) with images in two splits (leakage)",
                   "label_conflicts": "image(s) under two labels", "duplicates": "duplicate(s) within a split",
                   "unreadable": "unreadable image(s)", "outliers": "image(s) with unusual headers",
                   "nearly_constant": "nearly blank image(s)"}


def _doctor(run: Path) -> str:
    """The findings of `medclf doctor` (doctor.json: train's brief check or the full one) when the run holds them."""
    report = _json(run / "doctor.json")
    if not report:
        return ""
    checked = report.get("checks") or ["all `medclf doctor` checks"]
    lines = [f"- {len(report[key])} {words}" for key, words in DOCTOR_FINDINGS.items()
             if isinstance(report.get(key), list)]
    return (f"\nData checks (`medclf doctor`, doctor.json; checked: {', '.join(checked)}):\n\n"
            + "\n".join(lines or ["- no findings recorded"]) + "\n")


def _evaluation_data(metrics: dict, fingerprint: dict) -> str:
    lines = []
    for split in ("val", "oof", "test"):
        if split in metrics:
            lines.append(f"- **{SPLIT_WORDS[split]}**: {metrics[split].get('n', '?')} images")
    if "oof" in metrics:
        lines.append("- Out-of-fold: every train+val image predicted by the fold model that never trained on it.")
    if "val" in metrics:
        chose_epoch = (metrics.get("estimate") or {}).get("method") == METHOD_VAL_SELECTED
        lines.append(f"- Validation chose the operating point{' and the checkpoint (best epoch)' * chose_epoch}.")
    if "test" in metrics:
        lines.append("- Test was used for nothing but these numbers.")
    else:
        lines.append("- There is no test split: no image was held out from every choice.")
    return "## Evaluation data\n\n" + "\n".join(lines) + "\n"


def _preprocessing(config: dict, ckpt: dict) -> str:
    crop = ckpt.get("crop", 1.0)
    return ("## Preprocessing\n\n"
            f"1. Decode the image (PNG/JPEG/…; 16-bit and DICOM scaled to 8 bits"
            f"{_dicom_rule(ckpt)}), convert to "
            f"{ckpt.get('in_chans', '?')} channel(s), resize to {ckpt.get('store_size', ckpt.get('input_size', '?'))} px.\n"
            f"2. Keep the centre {fmt(crop, 3)} of each side and resize to {ckpt.get('input_size', '?')} px.\n"
            f"3. Scale to [0, 1], subtract mean {ckpt.get('mean')} and divide by std {ckpt.get('std')}.\n"
            f"4. Training only: augmentation preset `{config.get('augment', '?')}`"
            f"{', intensity ' + str(config['intensity']) if config.get('intensity') else ''}; "
            f"test-time augmentation {'on (flip)' if config.get('tta') else 'off'}.\n")


def _dicom_rule(ckpt: dict) -> str:
    """The DICOM mapping the checkpoint records, so a deployer applies the same windowing and inversion."""
    mapping = ckpt.get("dicom_mapping")
    return (f"; DICOM by mapping `{mapping}`: Modality LUT, the file's VOI LUT or window, MONOCHROME1 inverted "
            "(medclf/data/dicom.py, manifest.json `decode.dicom`)") if mapping else ""


def _training_settings(config: dict, plan: dict) -> str:
    reasons = plan.get("reasons", {})
    rows = [[name, f"`{config[name]}`", reasons.get(name, "")] for name in SETTINGS if name in config]
    return ("## Training settings\n\nSettings not given by the user were chosen by `medclf plan`; its reasons:\n\n"
            + _table(["setting", "value", "why"], rows))


def _quantitative(metrics: dict, classes: list[str]) -> str:
    text = "## Quantitative analyses\n\n"
    est = metrics.get("estimate")
    if est:
        rows = [[label, fmt(est[m]["value"]), _ci(est[m]["ci95"])] for m, label in headline_of(est).items() if m in est]
        text += (f"### Expected performance on new images (estimate)\n\nFrom {est['n']} images, method: "
                 f"{est['method']}.\n\n" + _table(["metric", "value", "95% CI"], rows))
        text += "".join(f"\n> {w}\n" for w in est.get("warnings", []))
    splits = [s for s in ("val", "oof", "test") if s in metrics]
    for split in splits:
        m = metrics[split]
        cis = m.get("ci95") or {}
        rows = [[label, fmt(m.get(key)), _ci(cis.get(key))] for key, label in headline_of(m).items()]
        text += f"\n### {SPLIT_WORDS[split].capitalize()} ({m.get('n', '?')} images)\n\n"
        text += _table(["metric", "value", "95% CI"], rows)
        if "per_label" in m:
            per_label = m["per_label"]
            rows = [[f"`{c}`", fmt(per_label[c]["auc"]), fmt(per_label[c]["threshold"]),
                     fmt(per_label[c]["sensitivity"]), fmt(per_label[c]["specificity"]),
                     fmt(per_label[c]["precision"]), per_label[c]["support"]] for c in classes if c in per_label]
            text += "\n" + _table(["label", "ROC AUC", "threshold", "sensitivity", "specificity", "precision",
                                    "positive images"], rows)
        else:
            per_class = m.get("per_class", {})
            rows = [[f"`{c}`", fmt(per_class[c]["recall"]), fmt(per_class[c]["specificity"]),
                     fmt(per_class[c]["precision"]), per_class[c]["support"]] for c in classes if c in per_class]
            text += "\n" + _table(["class", "sensitivity", "specificity", "precision", "images"], rows)
        if m.get("ece") is not None:
            text += f"\nCalibration: ECE {fmt(m['ece'])}.\n"
        threshold = m.get("threshold")
        if isinstance(threshold, dict) and threshold.get("value") is not None:
            text += (f"\nAt the operating point (threshold {fmt(threshold['value'])}, chosen on "
                     f"{threshold.get('chosen_on', '?')}): accuracy {fmt(threshold.get('accuracy'))}, balanced "
                     f"accuracy {fmt(threshold.get('balanced_accuracy'))}, macro F1 {fmt(threshold.get('f1_macro'))}.\n")
    return text


def _ethics() -> str:
    return ("## Ethical considerations\n\n"
            "- A wrong answer can harm a patient: a missed finding delays care, a false alarm causes needless "
            "tests. The per-class sensitivity and specificity above say how often each happens on the evaluation "
            "images, not on your patients.\n"
            "- Training images may under-represent some patient groups; medclf cannot check this without "
            "demographic data, so performance on any subgroup is unknown.\n"
            "- Images and labels are medical data: keep them and the model's outputs under the same privacy "
            "rules as the source data.\n")


def _caveats(metrics: dict, fingerprint: dict) -> str:
    notes = []
    for split in ("val", "oof", "test"):
        n = metrics.get(split, {}).get("n")
        if n is not None and n < SMALL_SPLIT:
            notes.append(f"The {SPLIT_WORDS[split]} split has only {n} images (fewer than {SMALL_SPLIT}): its "
                         "metrics are noisy and their 95% intervals wide.")
    notes += list((metrics.get("estimate") or {}).get("warnings", []))
    est, test = metrics.get("estimate"), metrics.get("test")
    if est and test and est.get("accuracy", {}).get("ci95") and test.get("accuracy") is not None:
        low, high = est["accuracy"]["ci95"]
        if not low <= test["accuracy"] <= high:
            notes.append(f"Distribution shift: test accuracy {fmt(test['accuracy'])} lies outside the estimate's "
                         f"95% interval {_ci([low, high])}: the test images differ from the training/validation "
                         "images; expect the same on other data.")
    ratio = fingerprint.get("imbalance_ratio")
    if ratio and ratio > 3:
        notes.append(f"Classes are imbalanced ({ratio:.1f}×): accuracy flatters the majority class; read balanced "
                     "accuracy and per-class sensitivity.")
    notes.append("Performance on images from another hospital, scanner or population is unknown and usually "
                 "lower; validate on local data before relying on it.")
    return "## Caveats and recommendations\n\n" + "".join(f"- {n}\n" for n in notes)


def _reproduce(run: Path, config: dict) -> str:
    return ("## How to reproduce\n\n"
            f"```\nmedclf train --config {run / 'config.yaml'} {config.get('data', 'DATA')} --out NEW_RUN\n```\n\n"
            "config.yaml holds every resolved setting and the seed; splits.csv lists the images of each split. "
            "The same data, software versions and device type give the same model.\n")
