"""comparison.html: one self-contained page from comparison.json and the runs' histories."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import figures, plots
from . import htmlpage as H
from .metrics import classification_metrics

SIGNIFICANT = 0.05


def write_comparison_html(out: Path, result: dict, run_dirs: dict[str, list[Path]], labels: np.ndarray,
                          pooled: dict[str, np.ndarray], classes: list[str]) -> Path:
    from .compare import metric_label, summary_text

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
    rows = [[metric_label(m)] + [mean_std(a, m) for a in names] + [diff_cell(a, b, m) for a, b in show_pairs]
            for m in metrics]
    main_table = H.table(header, rows) + (
        f'<p class="muted">Mean ± standard deviation over {len(result["seeds"])} seed(s) on the same '
        f'{result["n_images"]} {H.esc(result["split"])} images. Differences: each arm\'s per-image probabilities '
        "averaged over its seeds, then compared on the same images (95% CI in brackets); "
        f"<span class=sig>*</span> p &lt; {SIGNIFICANT}, not corrected for multiple comparisons.</p>")

    pair_rows = []
    for i, r in enumerate(result["pairwise"]):
        star = r["p_value"] is not None and r["p_value"] < SIGNIFICANT
        pair_rows.append([H.esc(r["a"]), H.esc(r["b"]), metric_label(r["metric"]),
                          H.num(r.get("a_value"), ["pairwise", i, "a_value"]),
                          H.num(r.get("b_value"), ["pairwise", i, "b_value"]),
                          H.num(r["difference"], ["pairwise", i, "difference"]),
                          f"{H.num(r['ci95'][0], ['pairwise', i, 'ci95', 0])} to "
                          f"{H.num(r['ci95'][1], ['pairwise', i, 'ci95', 1])}",
                          H.num(r["p_value"], ["pairwise", i, "p_value"]) + (" <span class=sig>*</span>" if star else ""),
                          f'<span class="muted">{H.esc(r["method"])}</span>'])
    pair_table = H.table(["a", "b", "metric", "a (pooled)", "b (pooled)", "a − b", "95% CI", "p", "test"], pair_rows,
                         cls="pairs")

    histories = {arm: [plots.read_history(d / "history.csv") for d in dirs if (d / "history.csv").is_file()]
                 for arm, dirs in run_dirs.items()}
    curves = H.img(H.figure_uri(figures.arm_curves_figure(histories)), "validation curves",
                   caption="Validation metrics per epoch: one colour per arm, one line per seed.")
    roc = H.img(H.figure_uri(figures.arm_roc_figure(labels, pooled, classes, f"ROC ({result['split']})")),
                "ROC curves", caption="Each arm's probabilities averaged over its seeds.")
    cms = {arm: classification_metrics(labels, p, classes)["confusion_matrix"] for arm, p in pooled.items()}
    confusion = H.img(H.figure_uri(figures.confusion_grid_figure(cms, classes)), "confusion matrices",
                      caption="Rows: true class; columns: predicted class of the seed-averaged probabilities.")

    run_rows = []
    for arm in names:
        for k, run in enumerate(arms[arm]["runs"]):
            rel = Path(run["dir"]).name
            link = f'<a href="{H.esc(rel)}/report.html">{H.esc(rel)}</a>'
            run_rows.append([H.esc(arm), str(run["seed"]), link]
                            + [H.num(arms[arm]["metrics"][m]["values"][k], ["arms", arm, "metrics", m, "values", k])
                               for m in ("accuracy", "balanced_accuracy", "auc", "f1_macro")])
    runs_table = H.table(["arm", "seed", "run (report)", "accuracy", "balanced accuracy", "AUC", "macro F1"], run_rows)
    settings = "".join(f"<li><b>{H.esc(a)}</b>: {H.esc(', '.join(f'{k}={v}' for k, v in arms[a]['flags'].items()) or 'defaults')}</li>"
                       for a in names)
    note = f'<p class="note">{H.esc(result["split_note"])}</p>' if result.get("split_note") else ""

    sections = [
        H.section("Summary", f'<p class="summary">{H.esc(summary_text(result))}</p><ul>{settings}</ul>{note}', "summary"),
        H.section("Results", main_table, "results"),
        H.section("Validation curves", curves, "curves"),
        H.section(f"ROC curves and confusion matrices ({result['split']})", roc + confusion, "roc"),
        H.section("All pairwise tests", pair_table, "pairwise"),
        H.section("Runs", runs_table, "runs"),
    ]
    subtitle = (f"data {H.esc(result['data'])}, {H.esc(result['split'])} split, {result['n_images']} images, "
                f"{len(classes)} classes, seeds {', '.join(map(str, result['seeds']))}")
    return H.write(out / "comparison.html", H.page("medclf comparison: " + " vs ".join(names), subtitle, sections))
