"""OUT/tune.html of `medclf tune`: the optimisation history, parameter importances and every trial, one page."""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from . import html
from .figures import new_figure

MIN_TRIALS_FOR_IMPORTANCE = 2  # fANOVA fits a forest to the complete trials: one trial explains nothing


def write_tune_page(path: Path, study, summary: dict, setup: dict) -> Path:
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    sections = [html.section("Result", _result(summary, setup), "result"),
                html.section("Optimisation history", _history(all_trials), "history"),
                html.section("Parameter importances", _importances(study, complete, setup), "importances"),
                html.section("Trials", _trial_table(all_trials, setup), "trials")]
    subtitle = (f"study {html.esc(summary['study'])} in {html.esc(summary['storage'])}; "
                f"data {html.esc(setup['data'])}")
    return html.write(path, html.page("medclf tune", subtitle, sections))


def _result(summary: dict, setup: dict) -> str:
    best, default = summary["best"], summary["default"]
    states = ", ".join(f"{n} {s}" for s, n in summary["states"].items() if n)
    lines = [f"Score: {html.esc(setup['scoring'])}; lower is better.", f"Trials: {states}."]
    if best is None:
        lines.append("No trial completed: nothing to recommend.")
    else:
        lines.append(f"Best: trial {best['trial']}, score {html.num(best['score'], digits=4)} "
                     f"(accuracy {html.num(best['accuracy'])}, AUC {html.num(best['auc'])}): "
                     f"<code>{html.esc(_params(best['params']))}</code>.")
        if default is None:
            lines.append("The plan's default trial did not complete, so the search cannot be compared with it.")
        else:
            verdict = ("beat" if best["score"] < default["score"] else "did not beat")
            lines.append(f"The plan's default (trial {default['trial']}) scored {html.num(default['score'], digits=4)}: "
                         f"the search {verdict} it on the same {'folds' if setup['folds'] >= 2 else 'validation split'}.")
        lines.append(f"Re-run the best: <code>medclf train --config {html.esc(Path(summary['out']) / 'best.yaml')}</code>")
    return '<div class="summary">' + "<br>".join(lines) + "</div>"


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _history(all_trials: list) -> str:
    from optuna.trial import TrialState

    scored = [(t.number, t.value, t.user_attrs.get("default", False)) for t in all_trials
              if t.state == TrialState.COMPLETE]
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in all_trials
              if t.state == TrialState.PRUNED and t.intermediate_values]
    if not scored and not pruned:
        return '<p class="note">No trial has a score yet.</p>'
    fig, ax = new_figure((7, 3.6))
    if scored:
        numbers, values, _ = zip(*scored)
        ax.plot(numbers, values, "o", label="complete trial")
        best_so_far = [min(values[:i + 1]) for i in range(len(values))]
        ax.step(numbers, best_so_far, where="post", color="black", linewidth=1, label="best so far")
        defaults = [(n, v) for n, v, d in scored if d]
        if defaults:
            ax.plot(*zip(*defaults), "s", markerfacecolor="none", markersize=11, color="tab:red",
                    label="plan's default")
    if pruned:
        ax.plot(*zip(*pruned), "x", color="gray", label="pruned (last reported loss)")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation loss (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return html.img(html.figure_uri(fig), "optimisation history",
                    caption="Each trial's score in the order the trials started; the line is the best so far.")


def _importances(study, complete: list, setup: dict) -> str:
    if not setup["space"]:
        return '<p class="note">Every searched setting was fixed by a flag: nothing was searched.</p>'
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return (f'<p class="note">Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials '
                f"(this study has {len(complete)}).</p>")
    import optuna

    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=setup["seed"])
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    if not importances:
        return '<p class="note">No parameter varied between the complete trials.</p>'
    names = list(importances)[::-1]
    fig, ax = new_figure((6, 0.4 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("share of the score's variance (fANOVA)")
    fig.tight_layout()
    return html.img(html.figure_uri(fig), "parameter importances",
                    caption=f"fANOVA over {len(complete)} complete trials: how much of the score's variance each "
                            "setting explains. Few trials make these rough.")


def _trial_table(all_trials: list, setup: dict) -> str:
    from optuna.trial import TrialState

    names = list(setup["space"])
    redone_as = {t.system_attrs["failed_trial"]: t.number for t in all_trials if "failed_trial" in t.system_attrs}
    rows = []
    for t in all_trials:
        notes = []
        if t.user_attrs.get("default"):
            notes.append("plan's default")
        if "failed_trial" in t.system_attrs:
            notes.append(f"re-run of trial {t.system_attrs['failed_trial']}")
        if t.number in redone_as:
            notes.append(f"ended without a result (process lost or interrupted); run again as trial {redone_as[t.number]}")
        if "pruned_at_epoch" in t.user_attrs:
            notes.append(f"pruned at epoch {t.user_attrs['pruned_at_epoch']}")
        if "error" in t.user_attrs:
            notes.append(html.esc(t.user_attrs["error"]))
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_start is not None and t.datetime_complete is not None else math.nan)
        started = t.state != TrialState.WAITING  # a queued re-run carries the attributes of the trial it re-does
        folder = t.user_attrs.get("dir") if started else None
        link = f'<a href="{html.esc(folder)}/">{html.esc(folder)}</a>' if folder else "—"
        rows.append([str(t.number), t.state.name.lower(), html.num(t.value, digits=4),
                     html.num(t.user_attrs.get("accuracy")), html.num(t.user_attrs.get("auc")),
                     html.fmt(t.user_attrs.get("minutes") if started else None, 2), html.fmt(seconds / 60, 2)]
                    + [html.esc(_shown(t.params.get(n))) for n in names] + [link, "; ".join(notes)])
    header = ["trial", "state", "score", "accuracy", "AUC", "budget min", "took min"] + names + ["folder", "note"]
    return html.table(header, rows)


def _shown(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
