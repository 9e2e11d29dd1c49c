"""report.html for a run: what to expect on new images (the estimate), metrics with bootstrap CIs,
per-class sensitivity/specificity, curves, ROC/PR, calibration, the most confident mistakes with
Grad-CAM, dataset summary, config and plan. A --folds run shows its out-of-fold predictions (oof.csv)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from .. import inference, metrics, runtime, serialize, tasks
from ..config import load_yaml
from ..data.store import Store
from ..errors import MedclfError
from ..gradcam import grad_cam, overlay
from ..oof import read_oof
from ..stats import bootstrap_ci, expected_calibration_error, proportion_ci, reliability_bins, sampled_test_accuracy_range
from . import figures
from . import html as H

HEADLINE = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc": "ROC AUC", "f1_macro": "macro F1"}
GALLERY_SIDE = 150
SPLIT_NAMES = {"oof": "out-of-fold"}


def report(run: str | Path, data: str | None = None, out: str | Path | None = None, device: str = "auto",
           stores: dict[str, Store] | None = None, predictions: dict[str, np.ndarray] | None = None,
           n_boot: int = 1000, max_mistakes: int = 8) -> str:
    """Write RUN/report.html (or `out`) and return its path. Same as `medclf report RUN`.

    `data` overrides the run's config.yaml `data` (e.g. the data moved); `stores` (split → Store)
    and `predictions` (split → N×K probabilities) let `train` pass what it already holds.
    """
    run = Path(run)
    if not (run / "model.pt").is_file():
        raise MedclfError(f"not a run directory (no model.pt): {run}")
    stores_given = stores
    config = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    same_device = str(runtime.pick_device(device)) == str(config.get("device"))
    loaded = inference.load_for_inference(run / "model.pt", device,
                                          config.get("precision", "auto") if same_device else "auto")
    ckpt = loaded.ckpt
    classes = ckpt["classes"]
    data = data or config.get("data") or ckpt.get("config", {}).get("data")
    notes: list[str] = []
    evaluated = _out_of_fold(run, classes, ckpt.get("threshold"))
    # a --folds run's ensemble trained on its val images: only test is held out from it
    predicted = ("test",) if evaluated else ("val", "test")
    if stores is None:
        stores = _load_splits(ckpt, data, config, run, notes, predicted)
    for split in predicted:
        store = stores.get(split)
        if store is None or not len(store):
            continue
        probs = (predictions or {}).get(split)
        if probs is None:
            probs = loaded.predict(store, tta=bool(config.get("tta")))
        labels = store.labels.numpy()
        split_metrics = serialize.json_safe(metrics.evaluate_predictions(labels, probs, classes,
                                                                         tasks.decision_threshold(ckpt)))
        evaluated[split] = {"store": store, "labels": labels, "probs": probs, "metrics": split_metrics}
    if not evaluated:
        raise MedclfError(f"{data} has neither a val nor a test split to report on")
    saved = _saved_metrics(run)
    _check_against_metrics_json(saved, evaluated, notes)
    if tasks.is_multilabel(ckpt):
        from .multilabel_report import sections as multilabel_sections

        sections = multilabel_sections(run, evaluated, saved, classes, ckpt.get("thresholds"), n_boot)
    else:
        sections = _single_label_sections(run, loaded, evaluated, saved, classes, n_boot, max_mistakes)
    if notes:
        sections.insert(0, "".join(f'<p class="note">{H.esc(n)}</p>' for n in notes))
    ensemble = f"ensemble of {ckpt['ensemble']} × " if "ensemble" in ckpt else ""
    subtitle = (f"{ensemble}{H.esc(ckpt['arch'])} ({H.esc(ckpt['stem'])} stem, {ckpt['input_size']} px, {ckpt['in_chans']} ch), "
                f"weights {H.esc(ckpt.get('weights', config.get('weights', '?')))}, {len(classes)} "
                f"{'labels' if tasks.is_multilabel(ckpt) else 'classes'}, data {H.esc(data)}")
    path = Path(out) if out else run / "report.html"
    H.write(path, H.page(f"medclf report: {run.name}", subtitle, sections))
    if stores_given is None and (run / "metrics.json").is_file():  # `medclf report RUN`: the card follows the code
        from ..model_card import write_model_card

        write_model_card(run)
    return str(path)


def _single_label_sections(run: Path, loaded: inference.LoadedModel, evaluated: dict, saved: dict,
                           classes: list[str], n_boot: int, max_mistakes: int) -> list[str]:
    ckpt = loaded.ckpt
    shown = next(split for split in ("test", "val", "oof") if split in evaluated)
    s, name = evaluated[shown], SPLIT_NAMES.get(shown, shown)
    cams = ", with Grad-CAM" if s["store"] is not None else ""
    return [
        H.section("What to expect on new images", _expectation(saved, evaluated, classes, n_boot), "estimate"),
        _summary(evaluated, shown, classes, n_boot),
        H.section("Metrics with 95% confidence intervals", _metrics_tables(evaluated, classes, n_boot), "metrics"),
        H.section("Sensitivity and specificity per class", _per_class_tables(evaluated, classes, n_boot), "per-class"),
        H.section("Training curves", _curves(run), "curves"),
        H.section(f"Confusion matrix, ROC and precision-recall ({name})", _curve_figures(s, classes, name), "roc"),
        H.section(f"Calibration ({name})", _calibration(evaluated, shown), "calibration"),
        H.section(f"Most confident mistakes ({name}){cams}",
                  _mistakes(loaded, s, classes, max_mistakes), "mistakes"),
        H.section("Dataset", _dataset(run, ckpt, s["store"], classes, shown), "dataset"),
        H.section("Configuration and plan", _config(run), "config"),
    ]


def _out_of_fold(run: Path, classes: list[str], threshold: float | None) -> dict:
    """{"oof": ...} from RUN/oof.csv of a --folds run (its recorded predictions, never re-made), else {}."""
    oof = read_oof(run)
    if oof is None:
        return {}
    if oof.classes != classes:
        raise MedclfError(f"{run}/oof.csv has the classes {', '.join(oof.classes)}, the model {', '.join(classes)}")
    split_metrics = serialize.json_safe(metrics.evaluate_predictions(oof.labels, oof.probs, classes, threshold))
    return {"oof": {"store": None, "labels": oof.labels, "probs": oof.probs, "metrics": split_metrics,
                    "ids": oof.ids, "folds": oof.folds}}


def _load_splits(ckpt: dict, data: str | None, config: dict, run: Path, notes: list[str],
                 wanted: tuple[str, ...] = ("val", "test")) -> dict[str, Store]:
    """The `wanted` splits as evaluate builds them, noting where they differ from the run's splits.csv."""
    if not data:
        raise MedclfError(f"{run}/config.yaml names no data; pass --data DATA")
    try:
        source = inference.open_data(ckpt, data)
    except MedclfError as exc:
        raise MedclfError(f"cannot rebuild the predictions for the report: {exc} (pass --data DATA)") from None
    stores = {}
    recorded = _split_ids(run)
    for split in wanted:
        if split not in source.splits:
            continue
        stores[split], _ = inference.split_store(ckpt, source, split, bool(config.get("skip_bad")),
                                                 bool(config.get("cache", True)))
        ids = recorded.get(split)
        if ids is not None and ids != list(stores[split].ids):
            notes.append(f"The {split} split rebuilt from {data} differs from the one recorded in splits.csv "
                         f"({len(stores[split])} vs {len(ids)} images); the numbers below are on the rebuilt split.")
    return stores


def _split_ids(run: Path) -> dict[str, list[str]]:
    path = run / "splits.csv"
    if not path.is_file():
        return {}
    ids: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ids.setdefault(row["split"], []).append(row["id"])
    return ids


def _saved_metrics(run: Path) -> dict:
    path = run / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_against_metrics_json(saved: dict, evaluated: dict, notes: list[str]) -> None:
    for split, e in evaluated.items():
        old = saved.get(split, {}).get("accuracy")
        if old is not None and abs(old - e["metrics"]["accuracy"]) > 1e-9:
            notes.append(f"{split} accuracy recomputed for this report ({e['metrics']['accuracy']:.4f}) differs "
                         f"from metrics.json ({old:.4f}): data or software changed since training.")


def _expectation(saved: dict, evaluated: dict, classes: list[str], n_boot: int) -> str:
    """The estimate of metrics.json, or for runs made before it existed, one made here from the held-out predictions."""
    est, key = saved.get("estimate"), ["estimate"]
    if est is None:
        key = None  # not in metrics.json: its numbers carry no JSON path
        est = _fallback_estimate(evaluated, classes, n_boot)
    if est is None:
        return '<p class="note">This run has no validation or out-of-fold predictions to estimate from.</p>'

    def at(*path):
        return None if key is None else key + list(path)

    rows = []
    for m, label in HEADLINE.items():
        value, ci = est[m]["value"], est[m]["ci95"]
        interval = ("—" if ci is None else
                    f"{H.num(ci[0], at(m, 'ci95', 0))} to {H.num(ci[1], at(m, 'ci95', 1))}")
        rows.append([label, H.num(value, at(m, "value")), interval])
    text = (f'<p class="summary">Expected performance on new images from the same source, with 95% '
            f'confidence intervals, from {H.num(est["n"], at("n"), 0)} images: {method_words(est["method"])}</p>')
    warnings = "".join(f'<p class="note">{H.esc(w)}</p>' for w in est["warnings"])
    origin = ("" if key is not None else '<p class="muted">metrics.json of this run has no estimate (made by an '
              f"older medclf): computed here from its {'out-of-fold' if 'oof' in evaluated else 'validation'} "
              "predictions.</p>")
    return text + warnings + H.table(["metric", "expected value", "95% CI"], rows) + _test_sets(est) + origin


TEST_SET_SIZES = (100, 500)  # test sets a user is likely to check the model on


def _test_sets(est: dict) -> str:
    """What accuracy a user's own test set will show: the CI is for the expected value, and a test set of a few
    hundred images scatters around that by its own sampling error, so say how far (HTML)."""
    acc = est.get("accuracy") or {}
    if acc.get("value") is None:
        return ""
    ranges = [(m, sampled_test_accuracy_range(acc["value"], acc.get("ci95"), m)) for m in TEST_SET_SIZES]
    spans = "; ".join(f"of {m} images, between {lo:.3f} and {hi:.3f}" for m, (lo, hi) in ranges)
    return ('<p class="muted" id="test-sets">The intervals are for the expected value. A test set of your own adds '
            f"its own sampling error: 95% of test sets {spans} (accuracy). A small test set outside the interval "
            "is not by itself a sign that the estimate was too high.</p>")


def _fallback_estimate(evaluated: dict, classes: list[str], n_boot: int) -> dict | None:
    """The estimate of a run whose metrics.json lacks one: its out-of-fold or (best-epoch choosing) val predictions."""
    if "oof" in evaluated:
        e, method = evaluated["oof"], metrics.METHOD_OOF.format(k=len(np.unique(evaluated["oof"]["folds"])))
    elif "val" in evaluated:
        e, method = evaluated["val"], metrics.METHOD_VAL_SELECTED  # runs before the estimate chose their epoch on val
    else:
        return None
    return metrics.estimate(e["labels"], e["probs"], classes, method, n_boot=n_boot)


def method_words(method: str) -> str:
    """How an estimate was made, in words (HTML)."""
    if method.startswith(metrics.METHOD_OOF.split(",")[0]):
        return (f"{H.esc(method)} cross-validation. Each image was predicted by the model of the fold that left it "
                "out of training, so every prediction is on an image its model never learned from.")
    if method == metrics.METHOD_VAL:
        return ("the validation split, which played no part in training or in choosing the checkpoint, so the "
                "estimate is unbiased.")
    if method == metrics.METHOD_VAL_SELECTED:
        return ("the validation split, which also chose the checkpoint (the best epoch). The model was picked "
                "because it did well on these very images, so the estimate is <b>optimistic</b>.")
    return H.esc(method) + "."


def _cis(e: dict, classes: list[str], n_boot: int) -> dict:
    """95% CIs of the headline metrics (cached per split; see metrics.headline_ci)."""
    if "cis" not in e:
        y, p = e["labels"], e["probs"]
        funcs = metrics.metric_functions(classes)
        e["cis"] = {m: metrics.headline_ci(m, funcs[m], y, p, n_boot=n_boot) for m in HEADLINE}
    return e["cis"]


def _class_cis(e: dict, classes: list[str], n_boot: int) -> dict:
    """95% CIs of per-class sensitivity and specificity: each a proportion of images (of the class, of the
    other classes), so the Wilson interval, which stays honest at 0 or 100% (a bootstrap would give zero width)."""
    y, predicted = np.asarray(e["labels"]), np.asarray(e["probs"]).argmax(1)
    out = {}
    for i, c in enumerate(classes):
        out[("recall", c)] = proportion_ci(int(((predicted == i) & (y == i)).sum()), int((y == i).sum()))
        out[("specificity", c)] = proportion_ci(int(((predicted != i) & (y != i)).sum()), int((y != i).sum()))
    return out


def _summary(evaluated: dict, shown: str, classes: list[str], n_boot: int) -> str:
    e = evaluated[shown]
    m, cis = e["metrics"], _cis(e, classes, n_boot)
    where = "out-of-fold predictions" if shown == "oof" else f"{shown} split"
    parts = [f"On the {where} ({m['n']} images) the model classified "
             f"{H.fmt(m['accuracy'] * 100, 1)}% correctly (95% CI {H.fmt(cis['accuracy'][0] * 100, 1)}–"
             f"{H.fmt(cis['accuracy'][1] * 100, 1)}%)"]
    if m["auc"] is not None:
        parts.append(f"with a ROC AUC of {H.fmt(m['auc'])} (95% CI {H.fmt(cis['auc'][0])}–{H.fmt(cis['auc'][1])})")
    text = " ".join(parts) + ". "
    sens = [f"{H.esc(c)} {_pct(m['per_class'][c]['recall'])}" for c in classes if m["per_class"][c]["support"]]
    text += "Sensitivity per class: " + ", ".join(sens) + ". "
    if "threshold" in m:
        t = m["threshold"]
        positive = H.esc(classes[1])
        text += (f"At the threshold chosen on {H.esc(t.get('chosen_on', 'val').split(' (')[0])} predictions (P({positive}) ≥ {H.fmt(t['value'])}) the sensitivity for "
                 f"{positive} is {_pct(t['per_class'][classes[1]]['recall'])} and its specificity "
                 f"{_pct(t['per_class'][classes[1]]['specificity'])}. ")
    if m["n"] < metrics.SMALL_ESTIMATE_N:
        text += (f"With fewer than {metrics.SMALL_ESTIMATE_N} images the intervals are wide: treat small differences "
                 "as noise.")
    return f'<p class="summary">{text}</p>'


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{H.fmt(value * 100, 0)}%"


def _metrics_tables(evaluated: dict, classes: list[str], n_boot: int) -> str:
    rows = []
    for split, e in evaluated.items():
        m, cis = e["metrics"], _cis(e, classes, n_boot)
        name = SPLIT_NAMES.get(split, split)
        rows.append([f"{name} (n={m['n']})"] + [f"{H.num(m[k], [split, k])} {H.ci(cis[k])}" for k in HEADLINE])
        if "threshold" in m:
            t = m["threshold"]
            rows.append([f"{name} at threshold {H.num(t['value'], [split, 'threshold', 'value'])}",
                         H.num(t["accuracy"], [split, "threshold", "accuracy"]),
                         H.num(t["balanced_accuracy"], [split, "threshold", "balanced_accuracy"]), "",
                         H.num(t["f1_macro"], [split, "threshold", "f1_macro"])])
    note = (f'<p class="muted">Accuracy: the Wilson interval (a proportion of images); the others: percentile '
            f'bootstrap over images, {n_boot} resamples, except where the metric is perfect (AUC: classes fully '
            f'separated), where every resample is '
            f'perfect too and each class\'s Wilson bound for zero errors sets the lower end (with under '
            f'{metrics.FEW_ERRORS} wrong images, no higher than that bound for the errors seen). Binary tasks: the '
            "threshold on P(class 1) is chosen on validation by Youden's J; the other rows use the most probable "
            "class.</p>")
    return H.table(["split"] + list(HEADLINE.values()), rows) + note


def _per_class_tables(evaluated: dict, classes: list[str], n_boot: int) -> str:
    html = ""
    for split, e in evaluated.items():
        m, cis = e["metrics"], _class_cis(e, classes, n_boot)
        header = ["class", "images", "sensitivity (recall)", "specificity", "precision", "F1"]
        if "threshold" in m:
            header += ["sensitivity at threshold", "specificity at threshold"]
        rows = []
        for c in classes:
            pc, key = m["per_class"][c], [split, "per_class", c]
            row = [H.esc(c), H.num(pc["support"], key + ["support"], 0),
                   f"{H.num(pc['recall'], key + ['recall'])} {H.ci(cis[('recall', c)])}",
                   f"{H.num(pc['specificity'], key + ['specificity'])} {H.ci(cis[('specificity', c)])}",
                   H.num(pc["precision"], key + ["precision"]), H.num(pc["f1"], key + ["f1"])]
            if "threshold" in m:
                tc, tkey = m["threshold"]["per_class"][c], [split, "threshold", "per_class", c]
                row += [H.num(tc["recall"], tkey + ["recall"]), H.num(tc["specificity"], tkey + ["specificity"])]
            rows.append(row)
        html += f"<h3>{H.esc(split)}</h3>" + H.table(header, rows)
    return html


def _curves(run: Path) -> str:
    if not (run / "history.csv").is_file():
        return '<p class="muted">no history.csv in the run</p>'
    history = figures.read_history(run / "history.csv")
    if not history:
        return '<p class="muted">history.csv is empty</p>'
    config = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    if (config.get("folds") or 0) >= 2:
        caption = (f"Loss and held-out-fold metrics per epoch, averaged over the {config['folds']} folds; each fold "
                   "model keeps the final weights of its completed schedule.")
    elif config.get("checkpoint") == "best":
        caption = "Loss and validation metrics per epoch; the model is the best epoch on the monitored metric."
    else:
        caption = "Loss and validation metrics per epoch; the model is the final weights of the completed schedule."
    return H.img(H.figure_uri(figures.curves_figure(history)), "training curves", caption=caption)


def _curve_figures(e: dict, classes: list[str], split: str) -> str:
    cm = e["metrics"]["confusion_matrix"]
    return '<div class="row">' + "".join([
        H.img(H.figure_uri(figures.confusion_figure(cm, classes, f"confusion matrix ({split})")), "confusion matrix",
              caption="Rows: true class; columns: predicted (most probable) class."),
        H.img(H.figure_uri(figures.roc_figure(e["labels"], e["probs"], classes, f"ROC ({split})")), "ROC curve",
              caption="Sensitivity against 1 − specificity over all thresholds."),
        H.img(H.figure_uri(figures.pr_figure(e["labels"], e["probs"], classes, f"precision-recall ({split})")),
              "precision-recall curve", caption="Dotted: the precision of guessing (the class's prevalence)."),
    ]) + "</div>"


def _calibration(evaluated: dict, shown: str) -> str:
    e = evaluated[shown]
    ece = expected_calibration_error(e["labels"], e["probs"])
    bins = reliability_bins(e["labels"], e["probs"], n_bins=10)
    others = ", ".join(f"{s} {H.fmt(expected_calibration_error(x['labels'], x['probs']))}" for s, x in evaluated.items())
    text = (f"<p>Expected calibration error (15 equal-width bins, top-label): {others}. An ECE of 0.05 means the "
            "stated confidence is off by about 5 percentage points on average; label smoothing during training "
            "tends to make models under-confident.</p>")
    return text + H.img(H.figure_uri(figures.reliability_figure(bins, ece, f"reliability ({shown})")),
                        "reliability diagram", caption="Bars: accuracy of the images in each confidence bin.")


def _display(view: np.ndarray, side: int = GALLERY_SIDE) -> np.ndarray:
    """An H×W or H×W×3 uint8 image upscaled (nearest) to `side` for display."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(view)).resize((side, side), Image.Resampling.NEAREST))


def _model_views(ckpt: dict, store: Store, indices) -> np.ndarray:
    """The images at `indices` as the model sees them (crop, size, channels), before normalisation, uint8."""
    return inference.view_uint8(inference.model_view(ckpt, store.take(torch.as_tensor(indices))))


def _mistakes(loaded: inference.LoadedModel, e: dict, classes: list[str], limit: int) -> str:
    labels, probs, store = e["labels"], e["probs"], e["store"]
    pred = probs.argmax(1)
    wrong = np.flatnonzero((pred != labels) & (labels >= 0))
    if not len(wrong):
        return "<p>No mistakes on this split.</p>"
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:limit]
    if store is None:
        return _out_of_fold_mistakes(e, wrong, pred, classes)
    raw = store.take(torch.as_tensor(wrong)).to(loaded.device)
    view = inference.model_view(loaded.ckpt, raw)  # preprocess = normalise(model_view): the view is shown as well
    x = inference.normalise(loaded.ckpt, view)
    cams = grad_cam(loaded.model, x, target=torch.as_tensor(pred[wrong])).cpu().numpy()
    views = inference.view_uint8(view)
    cards = []
    for j, i in enumerate(wrong):
        image = _display(views[j])
        name = Path(store.ids[i]).name if "/" in store.ids[i] else f"row {store.ids[i]}"
        caption = (f"true <b>{H.esc(classes[labels[i]])}</b> → predicted <b>{H.esc(classes[pred[i]])}</b> "
                   f"({probs[i, pred[i]]:.2f})<br><span class=\"muted\">{H.esc(name)}</span>")
        cards.append(f'<div class="card">{H.img(H.array_uri(image), "image")}'
                     f'{H.img(H.array_uri(overlay(image, cams[j])), "Grad-CAM")}<br>{caption}</div>')
    return (f"<p>The {len(wrong)} wrong predictions made with the highest confidence, each shown as the model saw it "
            "(its crop and size). Right: Grad-CAM for the predicted class (red = regions that raised that class's "
            f'score most).</p><div class="gallery">{"".join(cards)}</div>')


def _out_of_fold_mistakes(e: dict, wrong: np.ndarray, pred: np.ndarray, classes: list[str]) -> str:
    """The most confident out-of-fold mistakes as a table: no Grad-CAM, since the run's model trained on these images."""
    rows = [[H.esc(e["ids"][i][1]), H.esc(e["ids"][i][0]), str(e["folds"][i]), H.esc(classes[e["labels"][i]]),
             H.esc(classes[pred[i]]), H.fmt(e["probs"][i, pred[i]], 2)] for i in wrong]
    return (f"<p>The {len(wrong)} wrong out-of-fold predictions made with the highest confidence. No Grad-CAM: the "
            "run's model trained on these images, so its heat map would not explain the fold model's mistake.</p>"
            + H.table(["image", "split", "fold", "true", "predicted", "probability"], rows))


def _dataset(run: Path, ckpt: dict, store: Store | None, classes: list[str], shown: str) -> str:
    from ..model_card import split_counts

    counts = split_counts(run, {})
    html = ""
    if counts:
        names = list(counts)
        rows = [[H.esc(c)] + [str(counts[s][c]) for s in names] + [str(sum(counts[s][c] for s in names))]
                for c in classes]
        rows.append(["<b>all</b>"] + [str(sum(counts[s].values())) for s in names]
                    + [str(sum(sum(v.values()) for v in counts.values()))])
        html += H.table(["class"] + names + ["total"], rows)
    if (run / "skipped.txt").is_file():
        n = len((run / "skipped.txt").read_text().split())
        html += f'<p class="note">{n} unreadable image(s) were skipped; listed in skipped.txt.</p>'
    if store is None:
        return html
    labels = store.labels.numpy()
    html += f"<h3>Sample images ({H.esc(shown)}, as the model sees them before normalisation)</h3>"
    for i, c in enumerate(classes):
        picks = np.flatnonzero(labels == i)[:6]
        views = _model_views(ckpt, store, picks) if len(picks) else []
        thumbs = "".join(H.img(H.array_uri(_display(view, 96)), c, "thumb") for view in views)
        html += f"<p><b>{H.esc(c)}</b><br>{thumbs or '<span class=muted>none</span>'}</p>"
    return html


def _config(run: Path) -> str:
    html = ""
    for name, what in (("config.yaml", "Resolved configuration"), ("plan.yaml", "Plan")):
        if (run / name).is_file():
            html += f"<h3>{what} ({name})</h3><pre>{H.esc((run / name).read_text())}</pre>"
    return html or '<p class="muted">no config.yaml in the run</p>'


def write_run_outputs(out: Path, results: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                      stores: dict[str, Store], device: str) -> None:
    """The run's model card, plots and report.html, after metrics.json: a failure here costs that file, never the run."""
    from ..model_card import write_model_card

    write_model_card(out)
    shown = next(split for split in ("test", "val", "oof") if split in results and split in curves)
    problems = figures.save_run_plots(out, out / "history.csv", results[shown].get("confusion_matrix"), classes,
                                      *curves[shown], split=shown)
    try:
        report(out, stores=stores, predictions={s: p for s, (_, p) in curves.items()}, device=device)
    except Exception as exc:  # noqa: BLE001  report.html is a bonus: report the failure, keep the run
        problems.append(f"report.html not written ({type(exc).__name__}: {str(exc)[:300]}); "
                        f"retry with `medclf report {out}`")
    for problem in problems:
        print(f"medclf: warning: {problem}")
