"""comparison.html: one self-contained page from comparison.json and the runs' histories, and its summary text.

Reads only the comparison's numbers (it never imports medclf.comparison, which imports it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..metrics import confusion
from . import figures
from . import html as H

SIGNIFICANT = 0.05
LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc": "ROC AUC", "f1_macro": "macro F1",
          "auc_micro": "micro ROC AUC", "average_precision_macro": "macro average precision"}

RUN_COLUMNS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc": "AUC", "f1_macro": "macro F1"}
RUN_COLUMNS_MULTILABEL = {"auc": "macro AUC", "auc_micro": "micro AUC", "average_precision_macro": "macro AP"}


def metric_label(metric: str) -> str:
    """A metric's name in words (plain text: escape it for HTML)."""
    if metric in LABELS:
        return LABELS[metric]
    if metric.startswith("auc_"):  # multi-label: one label's AUC
        return f"ROC AUC ({metric.removeprefix('auc_')})"
    return f"sensitivity ({metric.removeprefix('recall_')})"


def write_comparison_html(out: Path, result: dict, run_dirs: dict[str, list[Path]], labels: np.ndarray,
                          pooled: dict[str, np.ndarray], classes: list[str]) -> Path:
    arms = result["arms"]
    names = list(arms)
    metrics = list(next(iter(arms.values()))["metrics"])
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    index = {(r["a"], r["b"], r["metric"]): i for i, r in enumerate(result["pairwise"])}
    show_pairs = pairs if len(pairs) <= 3 else []

    def mean_std(arm: str, metric: str) -> str:
        m = arms[arm]["metrics"][metric]
        key = ["arms", arm, "metrics", metric]
        return f"{H.num(m['mean'], key + ['mean'])} ± {H.num(m['std'], key + ['std'])}"

    def diff_cell(a: str, b: str, metric: str) -> str:
        i = index[(a, b, metric)]
        r = result["pairwise"][i]
        star = r["p_value"] is not None and r["p_value"] < SIGNIFICANT
        p = H.num(r["p_value"], ["pairwise", i, "p_value"])
        return (f"{H.num(r['difference'], ['pairwise', i, 'difference'])} {H.ci(r['ci95'])}"
                f"<br>p = {p}{' <span class=sig>*</span>' if star else ''}")

    header = ["metric"] + [H.esc(a) for a in names] + [f"{H.esc(a)} − {H.esc(b)}" for a, b in show_pairs]
    rows = [[H.esc(metric_label(m))] + [mean_std(a, m) for a in names] + [diff_cell(a, b, m) for a, b in show_pairs]
            for m in metrics]
    main_table = H.table(header, rows) + (
        f'<p class="muted">Mean ± standard deviation over {len(result["seeds"])} seed(s) on the same '
        f'{result["n_images"]} {H.esc(result["split"])} images. Differences: each arm\'s per-image probabilities '
        "averaged over its seeds, then compared on the same images (95% CI in brackets); "
        f"<span class=sig>*</span> p &lt; {SIGNIFICANT}, not corrected for multiple comparisons.</p>")

    pair_rows = []
    for i, r in enumerate(result["pairwise"]):
        star = r["p_value"] is not None and r["p_value"] < SIGNIFICANT
        pair_rows.append([H.esc(r["a"]), H.esc(r["b"]), H.esc(metric_label(r["metric"])),
                          H.num(r.get("a_value"), ["pairwise", i, "a_value"]),
                          H.num(r.get("b_value"), ["pairwise", i, "b_value"]),
                          H.num(r["difference"], ["pairwise", i, "difference"]),
                          f"{H.num(r['ci95'][0], ['pairwise', i, 'ci95', 0])} to "
                          f"{H.num(r['ci95'][1], ['pairwise', i, 'ci95', 1])}",
                          H.num(r["p_value"], ["pairwise", i, "p_value"]) + (" <span class=sig>*</span>" if star else ""),
                          f'<span class="muted">{H.esc(r["method"])}</span>'])
    pair_table = H.table(["a", "b", "metric", "a (pooled)", "b (pooled)", "a − b", "95% CI", "p", "test"], pair_rows,
                         cls="pairs")

    histories = {arm: [figures.read_history(d / "history.csv") for d in dirs if (d / "history.csv").is_file()]
                 for arm, dirs in run_dirs.items()}
    curves = H.img(H.figure_uri(figures.arm_curves_figure(histories)), "validation curves",
                   caption="Validation metrics per epoch: one colour per arm, one line per seed.")
    roc = H.img(H.figure_uri(figures.arm_roc_figure(labels, pooled, classes, f"ROC ({result['split']})")),
                "ROC curves", caption="Each arm's probabilities averaged over its seeds.")
    confusions = ""
    if labels.ndim == 1:  # multi-label decisions have no confusion matrix
        cms = {arm: confusion(labels, p.argmax(1), len(classes)) for arm, p in pooled.items()}
        confusions = H.img(H.figure_uri(figures.confusion_grid_figure(cms, classes)), "confusion matrices",
                          caption="Rows: true class; columns: predicted class of the seed-averaged probabilities.")

    headline = RUN_COLUMNS_MULTILABEL if "auc_micro" in metrics else RUN_COLUMNS
    run_rows = []
    for arm in names:
        for k, run in enumerate(arms[arm]["runs"]):
            rel = Path(run["dir"]).name
            link = f'<a href="{H.esc(rel)}/report.html">{H.esc(rel)}</a>'
            run_rows.append([H.esc(arm), str(run["seed"]), link]
                            + [H.num(arms[arm]["metrics"][m]["values"][k], ["arms", arm, "metrics", m, "values", k])
                               for m in headline])
    runs_table = H.table(["arm", "seed", "run (report)"] + list(headline.values()), run_rows)
    settings = "".join(f"<li><b>{H.esc(a)}</b>: {H.esc(', '.join(f'{k}={v}' for k, v in arms[a]['flags'].items()) or 'defaults')}</li>"
                       for a in names)
    note = f'<p class="note">{H.esc(result["split_note"])}</p>' if result.get("split_note") else ""
    if result.get("compared_on"):
        note = f'<p>Predictions compared: {H.esc(result["compared_on"])}.</p>' + note

    sections = [
        H.section("Summary", f'<p class="summary">{H.esc(summary_text(result))}</p><ul>{settings}</ul>{note}', "summary"),
        H.section("Results", main_table, "results"),
        H.section("Validation curves", curves, "curves"),
        H.section(f"ROC curves and confusion matrices ({result['split']})", roc + confusions, "roc"),
        H.section("All pairwise tests", pair_table, "pairwise"),
        H.section("Runs", runs_table, "runs"),
    ]
    subtitle = (f"data {H.esc(result['data'])}, {H.esc(result['split'])} split, {result['n_images']} images, "
                f"{len(classes)} classes, seeds {', '.join(map(str, result['seeds']))}")
    return H.write(out / "comparison.html", H.page("medclf comparison: " + " vs ".join(names), subtitle, sections))


def summary_text(result: dict) -> str:
    """One plain-language paragraph from the numbers."""
    arms = result["arms"]
    primary = "auc" if all(v["metrics"]["auc"]["mean"] is not None for v in arms.values()) else "accuracy"
    order = sorted(arms, key=lambda a: -(arms[a]["metrics"][primary]["mean"] or -1))
    best = order[0]
    n_seeds = len(result["seeds"])

    def ms(arm: str, metric: str) -> str:
        m = arms[arm]["metrics"][metric]
        return "—" if m["mean"] is None else f"{m['mean']:.3f} ± {m['std']:.3f}"

    where = "out-of-fold predictions" if result["split"] == "out-of-fold" else f"{result['split']} split"
    kind = "labels" if "auc_micro" in arms[best]["metrics"] else "classes"
    text = (f"On the {where} ({result['n_images']} images, {len(result['classes'])} {kind}) "
            f"{len(arms)} settings were trained with {n_seeds} seed{'s' if n_seeds > 1 else ''} each. "
            f"{best} reached the highest mean {metric_label(primary)} ({ms(best, primary)}), against "
            + ", ".join(f"{a} ({ms(a, primary)})" for a in order[1:]) + ". ")
    significant = 0
    for other in order[1:]:
        for metric in [m for m in dict.fromkeys((primary, "accuracy")) if m in arms[best]["metrics"]]:
            row = next(r for r in result["pairwise"] if r["metric"] == metric and {r["a"], r["b"]} == {best, other})
            sign = 1 if row["a"] == best else -1
            if row["difference"] is None or row["p_value"] is None:
                continue
            lo, hi = row["ci95"] if sign == 1 else [None if v is None else -v for v in row["ci95"][::-1]]
            test = "DeLong" if row["method"].startswith("DeLong") else "McNemar" if "McNemar" in row["method"] else "bootstrap"
            p = row["p_value"]
            verdict = "a statistically significant difference" if p < 0.05 else "not a statistically significant difference"
            significant += p < 0.05
            ci_text = f"95% CI {lo:+.3f} to {hi:+.3f}, " if lo is not None and hi is not None else ""
            text += (f"Pooling each arm's seeds, {best} minus {other} in {metric_label(metric)} is "
                     f"{sign * row['difference']:+.3f} ({ci_text}{test} p = {p:.3g}): {verdict}. ")
    text += ("Significance means p < 0.05 without correction for the number of comparisons. "
             if significant else "On these images the data cannot tell the settings apart with confidence. ")
    if result["n_images"] < 200 or n_seeds < 3:
        text += (f"With {result['n_images']} {result['split']} images and {n_seeds} seed(s) per setting, differences of a few "
                 "points are within the noise; more images or seeds narrow the intervals.")
    return text.strip()
