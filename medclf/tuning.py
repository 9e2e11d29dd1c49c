"""`medclf tune DATA`: an Optuna search over the settings that matter, each trial an ordinary medclf run.

Every trial is `medclf train` under OUT/trial-NNN with the searched settings (learning rate, weight decay,
augmentation preset and intensity, input size, label smoothing, model depth), the settings the user fixed,
and the plan's choices for the rest. The plan's own settings are queued as the first trial, so the study can
say whether the search beat them. A trial's score is the validation loss (cross-entropy, lower is better: a
proper scoring rule, so it rewards calibrated probabilities as well as ranking): the out-of-fold loss where the
plan cross-validates (small data), else the loss on the val split; one seed for every trial, so every trial
sees the same folds and the same split. A median pruner ends trials whose per-epoch validation loss is worse
than the median of earlier trials at that epoch.

The study lives in an SQL database (default OUT/tune.db, SQLite): the same command resumes it, and several
processes (or machines sharing a database server) can work on one study at once. A process that dies mid-trial
stops sending heartbeats; after GRACE_S seconds any process working on the study marks the trial failed and
queues its settings again.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from . import atomic, models, planning, tasks, training
from .config import CHOICES, TrainConfig, check_settings, config_field_names, load_yaml
from .data import sources
from .errors import MedclfError
from .oof import read_oof

HEARTBEAT_S = 10  # how often a running trial tells the database it is alive
GRACE_S = 60  # a running trial silent this long belongs to a dead process: it is failed and queued again
DB_FILE = "tune.db"
TRIAL_FILE = "trial.json"  # a trial folder's state: complete, pruned or failed, and why
DEFAULT_STUDY = "medclf"
LR_RANGE = (1e-4, 1e-2)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
SMOOTHING_RANGE = (0.0, 0.2)
INTENSITY_RANGE = (0.0, 1.0)
SEARCHED = ("lr", "weight_decay", "augment", "intensity", "size", "label_smoothing", "model")


def tune(data: str, trials: int = 10, time_budget: float | None = None, storage: str | None = None,
         out: str | None = None, study: str | None = None, progress: bool = True, **fixed: Any) -> dict:
    """Search training settings for DATA with Optuna; returns {"out", "best", "default", "trials", ...}.
    Same as `medclf tune`. `fixed`: training settings every trial keeps (they leave the search)."""
    import optuna

    _check_request(trials, time_budget, fixed)
    folder = Path(out) if out else Path("runs") / f"tune-{Path(str(data)).stem}"
    if folder.exists() and not folder.is_dir():
        raise MedclfError(f"--out {folder} is a file; give a folder for the study")
    folder.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{folder.resolve() / DB_FILE}"
    name = study or DEFAULT_STUDY
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's end is told by trial_result_line instead
    the_study = optuna.create_study(storage=open_storage(url, folder), study_name=name, direction="minimize",
                                    pruner=make_pruner(), load_if_exists=True)
    setup = _setup(the_study, str(data), trials, time_budget, fixed, progress)
    _queue_default(the_study, setup)
    try:
        _run_trials(the_study, setup, folder, trials, time_budget, progress)
    except KeyboardInterrupt:
        _requeue_interrupted(the_study, setup, folder)
        raise KeyboardInterrupt(f"the study is saved in {url}: the same `medclf tune` command resumes it "
                                "(the interrupted trial is run again)") from None
    from .reporting.tune_page import write_tune_page  # matplotlib: only once trials are done

    summary = summarize(the_study, setup, folder, url)
    if summary["best"] is not None:
        write_best_config(folder, summary, fixed)
    write_tune_page(folder / "tune.html", the_study, summary, setup)
    print(tune_summary_line(summary, folder))
    return summary


def _requeue_interrupted(study, setup: dict, folder: Path) -> None:
    """Ctrl-C fails the running trial (Optuna's rule); its settings are queued so a re-run does them again."""
    from optuna.trial import TrialState

    if setup.get("current") is None:
        return
    trial = study.get_trials(deepcopy=False)[setup["current"]]
    if trial.state == TrialState.FAIL and "error" not in trial.user_attrs:
        requeue_trial(study, trial, folder, "interrupted (Ctrl-C)")


def _check_request(trials: int, time_budget: float | None, fixed: dict) -> None:
    """Bad input is one line before anything is opened."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise MedclfError(f"--trials must be an integer >= 1 (got {trials!r})")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or not math.isfinite(time_budget) or time_budget <= 0):
        raise MedclfError(f"--time-budget must be a number of minutes > 0 (got {time_budget!r})")
    for name in ("out", "data", "resume"):
        fixed.pop(name, None)
    check_settings(**fixed)
    if fixed.get("refit"):
        raise MedclfError("tune scores trials on their validation or out-of-fold predictions: --refit has no place in "
                          "a trial (re-run best.yaml with --refit instead)")


def open_storage(url: str, folder: Path):
    """The study's database (an SQLAlchemy URL), with heartbeats so trials of a dead process are failed and re-done."""
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    if "://" not in url:
        raise MedclfError(f"--storage {url!r} is not a database URL: expected e.g. sqlite:///tune.db or "
                          "postgresql://user@host/db")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _experimental_warning())  # heartbeats are marked experimental
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=_requeue_dead_trial(folder))
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.DatabaseError,
            ImportError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MedclfError(f"--storage {url}: cannot open the study database ({first})") from None


def _experimental_warning() -> type[Warning]:
    from optuna.exceptions import ExperimentalWarning

    return ExperimentalWarning


def make_pruner():
    """Median pruning on the per-epoch validation loss, once two trials have finished and from the second epoch."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)


def _requeue_dead_trial(folder: Path) -> Callable:
    """Called on a trial whose process stopped sending heartbeats: queue its settings again, mark its folder."""
    def requeue(study, trial) -> None:
        requeue_trial(study, trial, folder, f"its process stopped mid-trial (no heartbeat for {GRACE_S} s)")
    return requeue


def requeue_trial(study, trial, folder: Path, why: str) -> None:
    """Queue a failed trial's settings again (Optuna's retry callback: the new trial records which one it re-does)
    and say so in the old trial's folder."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _experimental_warning())  # the retry callback is marked experimental
        RetryHeartbeatStaleTrialCallback(max_retry=3)(study, trial)
    trial_dir = folder / trial.user_attrs.get("dir", "")
    if trial.user_attrs.get("dir") and trial_dir.is_dir():
        close_trial_dir(trial_dir, trial.number, "failed", f"{why}; its settings were queued again")


# --------------------------------------------------------------------------- the study's fixed facts

def _setup(study, data: str, trials: int, time_budget: float | None, fixed: dict, progress: bool) -> dict:
    """What every trial shares: the data, the fixed settings, the folds, the search space and the default trial.
    A new study plans them (with the timing probe); a resumed one reads them back, so its trials stay comparable."""
    attrs = study.user_attrs
    resumed = "folds" in attrs
    plan_fixed = {k: v for k, v in fixed.items()
                  if k in planning.PLANNED or k in sources.DATA_OPTIONS or k in ("channels", "weights")}
    plan_fixed.pop("time_budget", None)
    per_trial = time_budget / trials if time_budget else None
    the_plan = planning.plan(data, time_budget=per_trial, out=None, weights=fixed.get("weights", "none"),
                             device=fixed.get("device", "auto"), seed=fixed.get("seed", 0), do_probe=not resumed,
                             verbose=progress and not resumed, **{k: v for k, v in plan_fixed.items() if k != "weights"})
    fp = the_plan["fingerprint"]
    data_key = str(Path(fp["data"]).resolve()) if Path(fp["data"]).exists() else fp["data"]  # the same from any folder
    if resumed:
        _check_same_study(study, data_key, fixed)
    side = int(round(fp["short_side"]["median"])) if fp.get("short_side") else 224
    stems = planning.candidate_stems(side)
    space = search_space(stems, fixed, the_plan["settings"]["model"])
    default = {name: _default_value(name, the_plan["settings"]) for name in space}
    folds = int(attrs["folds"]) if resumed else int(the_plan["settings"]["folds"])
    if not resumed:
        study.set_user_attr("data", data_key)
        study.set_user_attr("fixed", _plain(fixed))
        study.set_user_attr("folds", folds)
        study.set_user_attr("default_params", default)
    n_val = fp["images"].get("val", 0)
    n_pool = n_val + fp["images"].get("train", 0)
    scoring = (f"out-of-fold validation loss of {folds}-fold cross-validation on {n_pool} train+val images "
               f"(the folds of seed {fixed.get('seed', 0)}, the same in every trial; each trial's oof.csv lists them)"
               if folds >= 2 else f"validation loss on the val split ({n_val} images, the same in every trial)")
    return {"data": data, "fixed": fixed, "folds": folds, "space": space, "stems": stems,
            "default": dict(attrs.get("default_params", default)), "scoring": scoring,
            "task": fp.get("task", tasks.MULTICLASS), "seed": int(fixed.get("seed", 0)), "progress": progress}


def _check_same_study(study, data_root: str, fixed: dict) -> None:
    """A resumed study must tune the same data with the same fixed settings, or its trials are not comparable."""
    if data_root != study.user_attrs.get("data"):
        raise MedclfError(f"study {study.study_name!r} tunes {study.user_attrs.get('data')}, not {data_root}: "
                          "give another --study or --out")
    if _plain(fixed) != study.user_attrs.get("fixed"):
        raise MedclfError(f"study {study.study_name!r} was started with the fixed settings "
                          f"{study.user_attrs.get('fixed')}, not {_plain(fixed)}: resume it with the same flags, or "
                          "give another --study or --out")


def _plain(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


def search_space(stems: dict[int, str], fixed: dict, planned_model: str) -> dict:
    """The distributions searched; a setting the user fixed is not searched, nor one with a single choice.
    Fine-tuning a medclf model keeps its architecture and stem, so neither model nor size is searched then."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    base = fixed.get("weights") not in (None, "none", "imagenet")
    space = {"lr": FloatDistribution(*LR_RANGE, log=True),
             "weight_decay": FloatDistribution(*WEIGHT_DECAY_RANGE, log=True),
             "augment": CategoricalDistribution(CHOICES["augment"]),
             "intensity": FloatDistribution(*INTENSITY_RANGE),
             "size": CategoricalDistribution(sorted(stems)),
             "label_smoothing": FloatDistribution(*SMOOTHING_RANGE),
             "model": CategoricalDistribution(CHOICES["model"] if not base else (planned_model,))}
    if base or "stem" in fixed:
        space.pop("size")
    return {name: d for name, d in space.items() if name not in fixed
            and not (isinstance(d, CategoricalDistribution) and len(d.choices) < 2)}


def _default_value(name: str, settings: dict) -> Any:
    value = settings.get(name, getattr(TrainConfig(), name))
    return float(value) if isinstance(value, float) else value


def _queue_default(study, setup: dict) -> None:
    """The plan's settings as the next trial, unless a trial with them exists (or waits) already."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.user_attrs.get("default") and t.state != TrialState.FAIL for t in trials):
        return
    study.enqueue_trial(setup["default"], user_attrs={"default": True}, skip_if_exists=not trials)


# --------------------------------------------------------------------------- running trials

def finished(trial) -> bool:
    """Counts towards --trials: complete, pruned, or failed for its settings (e.g. diverged), not for its process."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def trial_minutes(all_trials: list, trials: int, time_budget: float | None) -> float | None:
    """Each trial's training budget: the study's minutes not yet spent over the trials still to run. Spent: the
    wall time of every finished trial, across re-runs and processes; a trial lost with its process (killed,
    Ctrl-C) does not count, as its end is only noticed later and its settings run again."""
    if time_budget is None:
        return None
    spent = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in all_trials
                if finished(t) and t.datetime_start is not None and t.datetime_complete is not None) / 60
    left = trials - sum(finished(t) for t in all_trials)
    return (time_budget - spent) / max(1, left)


def _run_trials(study, setup: dict, folder: Path, trials: int, time_budget: float | None, progress: bool) -> None:
    """Run trials until the study holds `trials` finished ones; wait for other processes' last trials."""
    import optuna
    from optuna.trial import TrialState

    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _experimental_warning())
            optuna.storages.fail_stale_trials(study)
        now = study.get_trials(deepcopy=False)
        done = sum(finished(t) for t in now)
        running = sum(t.state == TrialState.RUNNING for t in now)
        if done >= trials:
            return
        minutes = trial_minutes(now, trials, time_budget)
        if minutes is not None and minutes <= 0:
            sources.notice(f"the time budget of {time_budget:g} min is spent after {done} of {trials} trials")
            return
        if done + running >= trials:  # the last trials run elsewhere (or their process died: failed after GRACE_S)
            time.sleep(min(HEARTBEAT_S, GRACE_S))
            continue
        study.sampler = optuna.samplers.TPESampler(  # seeded by the trials so far: a resumed study repeats nothing
            seed=setup["seed"] + len(now), n_startup_trials=min(10, max(3, trials // 3)), multivariate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _experimental_warning())
            study.optimize(_objective(setup, folder, minutes), n_trials=1)
        print(trial_result_line(study, setup["current"]))
        if setup.get("fatal"):
            raise MedclfError(f"the plan's default settings (trial {setup['current']}) do not train: {setup['fatal']}")


def trial_result_line(study, number: int) -> str:
    from optuna.trial import TrialState

    trial = study.get_trials(deepcopy=False)[number]
    if trial.state == TrialState.COMPLETE:
        best = study.best_trial
        return f"medclf tune: trial {number} scored {trial.value:.4f} (best so far: trial {best.number}, {best.value:.4f})"
    if trial.state == TrialState.PRUNED:
        return f"medclf tune: trial {number} pruned at epoch {trial.user_attrs.get('pruned_at_epoch', '?')}"
    return f"medclf tune: trial {number} failed: {trial.user_attrs.get('error', 'see above')}"


def _objective(setup: dict, folder: Path, minutes: float | None) -> Callable:
    def objective(trial) -> float:
        import optuna

        setup["current"] = trial.number
        params = {name: _suggest(trial, name, dist) for name, dist in setup["space"].items()}
        trial_dir = folder / f"trial-{trial.number:03d}"
        trial.set_user_attr("dir", trial_dir.name)
        settings = {**setup["fixed"], **params, "data": setup["data"], "folds": setup["folds"],
                    "seed": setup["seed"], "out": str(trial_dir)}
        if "size" in params:  # the plan's stem for that size (small stride-1 stem, or the ImageNet stem upsampled)
            settings["stem"] = setup["stems"][params["size"]]
        if minutes is not None:
            settings["time_budget"] = minutes
            trial.set_user_attr("minutes", round(minutes, 3))
        print(f"medclf tune: trial {trial.number}" + (" (the plan's default)" if trial.user_attrs.get("default") else "")
              + (f", {minutes:.2f} min: the study's minutes left over its trials left" if minutes is not None else "")
              + f" → {trial_dir}")
        try:
            result = training.train(settings, force=True, progress=setup["progress"], on_epoch=_pruning(trial))
        except optuna.TrialPruned as exc:
            close_trial_dir(trial_dir, trial.number, "pruned", str(exc))
            raise
        except MedclfError as exc:
            close_trial_dir(trial_dir, trial.number, "failed", str(exc))
            if trial.user_attrs.get("default"):  # a problem with the data or the flags, not with the search:
                setup["fatal"] = str(exc)  # the study stops with that one line (a re-run does the default again)
            else:
                trial.set_user_attr("error", str(exc))  # these settings cannot train: a finished, failed trial
            return math.nan  # Optuna records a failed trial (without a traceback: no exception left the trial)
        score, metrics = score_run(trial_dir, result, setup["folds"], setup["task"])
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        close_trial_dir(trial_dir, trial.number, "complete", f"score {score:.6g}", score=score)
        return score
    return objective


def _suggest(trial, name: str, dist) -> Any:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def _pruning(trial) -> Callable[[int, dict], None]:
    """training.train's on_epoch hook: report each epoch's validation loss and prune when the pruner says so.
    Cross-validation reports its first fold (later folds start again from an untrained model)."""
    import optuna

    def on_epoch(epoch: int, row: dict) -> None:
        if row.get("fold", 1) != 1 or "val_loss" not in row:
            return
        loss = row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf
        trial.report(loss, epoch)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: validation loss {loss:.4f} is worse than the median "
                                     "of earlier trials at that epoch")
    return on_epoch


def score_run(trial_dir: Path, result: dict, folds: int, task: str) -> tuple[float, dict]:
    """The trial's validation loss (out-of-fold with folds), and its accuracy and AUC for the record."""
    if folds >= 2:
        oof = read_oof(trial_dir)
        score = tasks.validation_loss(oof.labels, oof.probs, task)
        shown = result["metrics"]["oof"]
    else:
        score = float(models.read_checkpoint(trial_dir / "model.pt")["val"]["val_loss"])
        shown = result["metrics"]["val"]
    return score, {"accuracy": shown.get("accuracy"), "auc": shown.get("auc")}


def close_trial_dir(trial_dir: Path, number: int, state: str, why: str, score: float | None = None) -> None:
    """trial.json says how the trial ended; a trial that did not complete keeps its config and learning curve
    but no weights, so nothing mistakes it for a finished run or resumes it."""
    if not trial_dir.is_dir():
        return
    if state != "complete":
        for weights in sorted(trial_dir.rglob("*.pt")):
            weights.unlink()
    atomic.write_text(trial_dir / TRIAL_FILE, json.dumps({"trial": number, "state": state, "why": why,
                                                          "score": score}, indent=2))


# --------------------------------------------------------------------------- results

def summarize(study, setup: dict, folder: Path, url: str) -> dict:
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    defaults = [t for t in complete if t.user_attrs.get("default")]
    return {"out": str(folder), "storage": url, "study": study.study_name, "scoring": setup["scoring"],
            "folds": setup["folds"], "trials": sum(finished(t) for t in all_trials),
            "states": {s.name.lower(): sum(t.state == s for t in all_trials) for s in TrialState},
            "best": _trial_record(best), "default": _trial_record(defaults[0] if defaults else None)}


def _trial_record(trial) -> dict | None:
    if trial is None:
        return None
    return {"trial": trial.number, "score": trial.value, "params": dict(trial.params), "dir": trial.user_attrs["dir"],
            "accuracy": trial.user_attrs.get("accuracy"), "auc": trial.user_attrs.get("auc")}


def write_best_config(folder: Path, summary: dict, fixed: dict) -> Path:
    """OUT/best.yaml: the best trial's resolved config.yaml, re-run by `medclf train --config OUT/best.yaml`
    (device and precision are picked again on the machine that re-runs it)."""
    best = summary["best"]
    config = load_yaml(folder / best["dir"] / "config.yaml")
    config = {k: v for k, v in config.items() if k in config_field_names() and k != "out"}
    for name in ("device", "precision", "channels_last"):
        config[name] = fixed.get(name, getattr(TrainConfig(), name))
    default = summary["default"]
    header = (f"# medclf tune: trial {best['trial']} of study {summary['study']}, the lowest {summary['scoring']}: "
              f"{best['score']:.4f}"
              + (f" (the plan's default, trial {default['trial']}: {default['score']:.4f})" if default else "")
              + f"\n# re-run: medclf train --config {folder / 'best.yaml'}\n")
    path = folder / "best.yaml"
    atomic.write_text(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def tune_summary_line(summary: dict, folder: Path) -> str:
    best, default = summary["best"], summary["default"]
    if best is None:
        return f"no trial completed ({summary['states']}); nothing to recommend → {folder / 'tune.html'}"
    versus = (f" vs the plan's default (trial {default['trial']}) {default['score']:.4f}" if default
              else " (the plan's default trial did not complete)")
    return (f"best: trial {best['trial']}, {summary['scoring'].split(' (')[0]} {best['score']:.4f}{versus} → "
            f"{folder / 'best.yaml'}, {folder / 'tune.html'}")
