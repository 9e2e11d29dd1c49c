"""report.html for a multi-label run: the estimate, macro/micro AUC with bootstrap CIs, a table per label
(AUC, average precision, threshold chosen on validation, sensitivity, specificity), training curves,
ROC and precision-recall per label, label prevalence per split, config and plan."""
from __future__ import annotations

from pathlib import Path

from .. import metrics
from ..stats import bootstrap_ci
from . import figures
from . import html as H

HEADLINE = {"auc": "macro ROC AUC", "auc_micro": "micro ROC AUC", "average_precision_macro": "macro average precision",
            "accuracy": "label accuracy"}


def sections(run: Path, evaluated: dict, saved: dict, classes: list[str], thresholds: list[float] | None,
             n_boot: int) -> list[str]:
    """The report's sections; `evaluated`: split → {"labels" N×L, "probs" N×L, "metrics"} (see run_report)."""
    from .run_report import _config, _curves  # the same sections as a single-label report

    shown = next(split for split in ("test", "val") if split in evaluated)
    e = evaluated[shown]
    return [
        H.section("What to expect on new images", _expectation(saved), "estimate"),
        H.section("Metrics with 95% bootstrap confidence intervals",
                  _metrics_table(evaluated, classes, thresholds, n_boot), "metrics"),
        H.section("Per label: AUC, average precision, sensitivity and specificity", _per_label(evaluated, classes),
                  "per-label"),
        H.section("Training curves", _curves(run), "curves"),
        H.section(f"ROC and precision-recall per label ({shown})", _curve_figures(e, classes, shown), "roc"),
        H.section("Label prevalence", _prevalence(evaluated, classes), "dataset"),
        H.section("Configuration and plan", _config(run), "config"),
    ]


def _expectation(saved: dict) -> str:
    est = saved.get("estimate")
    if est is None:
        return '<p class="note">metrics.json of this run has no estimate (no validation split).</p>'
    rows = []
    for m, label in HEADLINE.items():
        if m not in est:
            continue
        value, ci = est[m]["value"], est[m]["ci95"]
        interval = "—" if ci is None else f"{H.num(ci[0], ['estimate', m, 'ci95', 0])} to {H.num(ci[1], ['estimate', m, 'ci95', 1])}"
        rows.append([label, H.num(value, ["estimate", m, "value"]), interval])
    from .run_report import method_words

    text = (f'<p class="summary">Expected performance on new images from the same source, with 95% bootstrap '
            f'confidence intervals, from {H.num(est["n"], ["estimate", "n"], 0)} images: {method_words(est["method"])}</p>')
    warnings = "".join(f'<p class="note">{H.esc(w)}</p>' for w in est["warnings"])
    return text + warnings + H.table(["metric", "expected value", "95% CI"], rows)


def _metrics_table(evaluated: dict, classes: list[str], thresholds: list[float] | None, n_boot: int) -> str:
    funcs = metrics.multilabel_functions(classes, thresholds)
    rows = []
    for split, e in evaluated.items():
        m = e["metrics"]
        cis = {k: bootstrap_ci(funcs[k], e["labels"], e["probs"], n_boot=n_boot) for k in HEADLINE}
        rows.append([f"{H.esc(split)} (n={m['n']})"]
                    + [f"{H.num(m[k], [split, k])} {H.ci(cis[k])}" for k in HEADLINE]
                    + [H.num(m["exact_match"], [split, "exact_match"])])
    note = (f'<p class="muted">Percentile bootstrap over images, {n_boot} resamples. Macro AUC: the mean of the '
            "per-label AUCs; micro AUC: every (image, label) pair pooled. Label accuracy and exact match (every "
            "label of an image right) use each label's threshold, chosen on validation by Youden's J.</p>")
    return H.table(["split"] + list(HEADLINE.values()) + ["exact match"], rows) + note


def _per_label(evaluated: dict, classes: list[str]) -> str:
    html = ""
    header = ["label", "positives", "ROC AUC", "average precision", "threshold", "sensitivity", "specificity",
              "precision", "F1"]
    for split, e in evaluated.items():
        rows = []
        for c in classes:
            pl, key = e["metrics"]["per_label"][c], [split, "per_label", c]
            rows.append([H.esc(c), H.num(pl["support"], key + ["support"], 0)]
                        + [H.num(pl[k], key + [k]) for k in ("auc", "average_precision", "threshold", "sensitivity",
                                                             "specificity", "precision", "f1")])
        html += f"<h3>{H.esc(split)}</h3>" + H.table(header, rows)
    return html


def _curve_figures(e: dict, classes: list[str], split: str) -> str:
    return '<div class="row">' + "".join([
        H.img(H.figure_uri(figures.roc_figure(e["labels"], e["probs"], classes, f"ROC per label ({split})")),
              "ROC curves", caption="Sensitivity against 1 − specificity over all thresholds, one curve per label."),
        H.img(H.figure_uri(figures.pr_figure(e["labels"], e["probs"], classes, f"precision-recall ({split})")),
              "precision-recall curves", caption="Dotted: each label's prevalence (the precision of guessing)."),
    ]) + "</div>"


def _prevalence(evaluated: dict, classes: list[str]) -> str:
    names = list(evaluated)
    rows = [[H.esc(c)] + [str(int(evaluated[s]["labels"][:, j].sum())) for s in names] for j, c in enumerate(classes)]
    rows.append(["<b>images</b>"] + [str(len(evaluated[s]["labels"])) for s in names])
    rows.append(["<b>no label</b>"] + [str(int((evaluated[s]["labels"].sum(1) == 0).sum())) for s in names])
    return H.table(["label (positives)"] + names, rows)
