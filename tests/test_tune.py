"""`medclf tune`: an Optuna study of ordinary runs that resumes, survives a killed process, prunes and re-runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from htmlcheck import assert_self_contained, parse
from medclf import training, tuning
from medclf.cli import main
from medclf.config import load_yaml

REPO = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "1", "--batch-size", "16", "--model", "resnet18", "--no-cache"]


def trials_of(out: Path, study: str = tuning.DEFAULT_STUDY) -> list:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{out / tuning.DB_FILE}").get_trials()


def trial_state(out: Path, number: int) -> dict:
    return json.loads((out / f"trial-{number:03d}" / tuning.TRIAL_FILE).read_text())


def test_study_writes_trials_resumes_with_one_more_and_best_yaml_reruns(split_folder, tmp_path):
    out = tmp_path / "study"
    assert main(["tune", str(split_folder), "--trials", "3", "--out", str(out), "--folds", "0", *FAST]) == 0
    assert {p.name for p in out.iterdir()} >= {"trial-000", "trial-001", "trial-002", "tune.db", "best.yaml",
                                               "tune.html"}
    trials = trials_of(out)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:  # each trial an ordinary run whose config holds the trial's settings
        assert trial_state(out, t.number)["state"] == "complete"
        config = load_yaml(out / f"trial-{t.number:03d}" / "config.yaml")
        assert {k: config[k] for k in t.params} == t.params
    default = trials[0]
    assert default.user_attrs["default"] and default.params["lr"] == pytest.approx(1e-3 * (16 / 64) ** 0.5)
    assert default.params["label_smoothing"] == 0.1 and default.params["weight_decay"] == 1e-4
    page = (out / "tune.html").read_text()
    assert_self_contained(page)
    assert len(parse(page).images) == 2  # the optimisation history and the parameter importances
    before = {n: (out / f"trial-{n:03d}" / tuning.TRIAL_FILE).stat().st_mtime_ns for n in range(3)}

    assert main(["tune", str(split_folder), "--trials", "4", "--out", str(out), "--folds", "0", *FAST]) == 0
    assert len(trials_of(out)) == 4 and (out / "trial-003" / tuning.TRIAL_FILE).is_file()
    assert before == {n: (out / f"trial-{n:03d}" / tuning.TRIAL_FILE).stat().st_mtime_ns for n in range(3)}

    best = min(trials_of(out), key=lambda t: t.value)
    assert f"trial {best.number} " in (out / "best.yaml").read_text().splitlines()[0]
    rerun = tmp_path / "rerun"
    assert main(["train", "--config", str(out / "best.yaml"), "--out", str(rerun)]) == 0
    config = load_yaml(rerun / "config.yaml")
    assert {k: config[k] for k in best.params} == best.params
    assert (rerun / "metrics.json").is_file()


def test_cross_validated_trials_score_the_out_of_fold_loss(split_folder, tmp_path):
    from sklearn.metrics import log_loss

    out = tmp_path / "cv"
    result = tuning.tune(str(split_folder), trials=1, out=str(out), folds=2, epochs=1, batch_size=16,
                         model="resnet18", progress=False)
    oof = np.genfromtxt(out / "trial-000" / "oof.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    labels = (oof["label"] == "PNEUMONIA").astype(int)
    probs = np.stack([oof["prob_NORMAL"], oof["prob_PNEUMONIA"]], axis=1)
    probs /= probs.sum(axis=1, keepdims=True)  # float32 softmax rows, written as such: sum to 1 within 1e-7
    assert result["best"]["score"] == pytest.approx(log_loss(labels, probs), rel=1e-4)
    assert "2-fold cross-validation" in result["scoring"]


def test_a_killed_process_leaves_a_trial_that_the_rerun_redoes(split_folder, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    argv = ["tune", str(split_folder), "--trials", "1", "--out", str(out), "--folds", "0", "--epochs", "3",
            "--batch-size", "16", "--model", "resnet18", "--no-cache"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "medclf", *argv], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    history = out / "trial-000" / "history.csv"
    deadline = time.monotonic() + 300
    while not history.is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)  # mid-trial: the first of three epochs is written
    child.wait()
    assert trials_of(out)[0].state == TrialState.RUNNING
    monkeypatch.setattr(tuning, "GRACE_S", 1)
    monkeypatch.setattr(tuning, "HEARTBEAT_S", 1)

    assert main(argv) == 0
    killed, redone = trials_of(out)
    assert killed.state == TrialState.FAIL and redone.state == TrialState.COMPLETE
    assert redone.system_attrs["failed_trial"] == 0 and redone.params == killed.params
    assert redone.user_attrs["default"]
    assert trial_state(out, 0)["state"] == "failed" and not list((out / "trial-000").rglob("*.pt"))
    assert (out / "best.yaml").is_file()


def test_a_pruned_trial_keeps_its_curve_and_no_weights(split_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "make_pruner", lambda: optuna.pruners.ThresholdPruner(upper=0.0))  # every loss > 0
    out = tmp_path / "pruned"
    result = tuning.tune(str(split_folder), trials=2, out=str(out), folds=0, epochs=2, batch_size=16,
                         model="resnet18", cache=False, progress=False)
    assert [t.state for t in trials_of(out)] == [TrialState.PRUNED] * 2
    for n in range(2):
        folder = out / f"trial-{n:03d}"
        assert trial_state(out, n)["state"] == "pruned" and not list(folder.rglob("*.pt"))
        assert len((folder / "history.csv").read_text().splitlines()) == 2  # header and the pruned epoch
        assert (folder / "config.yaml").is_file()
    assert result["best"] is None and not (out / "best.yaml").exists()
    assert "No trial completed" in (out / "tune.html").read_text()


def test_on_epoch_sees_every_epoch_and_its_fold(split_folder, tmp_path):
    seen = []
    training.train({"data": str(split_folder), "out": str(tmp_path / "run"), "epochs": 2, "batch_size": 16,
                    "folds": 2, "model": "resnet18", "cache": False}, progress=False,
                   on_epoch=lambda epoch, row: seen.append((row["fold"], epoch, row["val_loss"])))
    assert [(fold, epoch) for fold, epoch, _ in seen] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(np.isfinite(loss) for _, _, loss in seen)


def test_each_trial_gets_the_minutes_left_over_the_trials_left():
    start = datetime(2026, 1, 1)
    ended = [SimpleNamespace(state=TrialState.COMPLETE, user_attrs={}, datetime_start=start,
                             datetime_complete=start + timedelta(minutes=m)) for m in (3, 5)]
    killed = SimpleNamespace(state=TrialState.FAIL, user_attrs={}, datetime_start=start,
                             datetime_complete=start + timedelta(minutes=9))  # noticed late, re-done: not counted
    diverged = SimpleNamespace(state=TrialState.FAIL, user_attrs={"error": "diverged"}, datetime_start=start,
                               datetime_complete=start + timedelta(minutes=1))  # finished: counted
    assert tuning.trial_minutes(ended + [killed, diverged], 5, 20.0) == pytest.approx((20 - 9) / 2)
    assert tuning.trial_minutes(ended, 4, None) is None


@pytest.mark.parametrize("flags, message", [
    (["--trials", "0"], "--trials must be an integer >= 1"),
    (["--storage", "tune.db"], "is not a database URL"),
    (["--storage", "nosuchdb://x/y"], "cannot open the study database"),
    (["--storage", "sqlite:////no/such/folder/tune.db"], "cannot open the study database"),
    (["--time-budget", "-1"], "--time-budget must be"),
    (["--refit"], "--refit"),
])
def test_bad_input_is_one_line_and_exit_2(split_folder, tmp_path, capsys, flags, message):
    assert main(["tune", str(split_folder), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medclf: error:") and message in err[0]


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["tune", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medclf: error:")


def test_a_resumed_study_refuses_other_data(split_folder, npz_file, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["tune", str(split_folder), "--trials", "1", "--out", str(out), "--folds", "0", *FAST]) == 0
    capsys.readouterr()
    assert main(["tune", str(npz_file), "--trials", "2", "--out", str(out), "--folds", "0", *FAST]) == 2
    assert "give another --study or --out" in capsys.readouterr().err
    assert yaml.safe_load((out / "best.yaml").read_text())["data"] == str(split_folder)


def test_ctrl_c_fails_the_trial_and_queues_its_settings_again(split_folder, tmp_path, monkeypatch, capsys):
    from conftest import interrupt_second_epoch

    interrupt_second_epoch(monkeypatch)
    out = tmp_path / "interrupted"
    assert main(["tune", str(split_folder), "--trials", "2", "--out", str(out), "--folds", "0", "--epochs", "2",
                 "--batch-size", "16", "--model", "resnet18", "--no-cache"]) == 130
    assert "the same `medclf tune` command resumes it" in capsys.readouterr().err
    interrupted, queued = trials_of(out)
    assert interrupted.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.params == interrupted.params and queued.user_attrs["default"]
    assert trial_state(out, 0)["state"] == "failed" and not list((out / "trial-000").rglob("*.pt"))


def _failing_trial(monkeypatch, number: int) -> None:
    """Trial `number` fails the way diverged settings do (MedclfError from training); the others train."""
    real = training.train

    def train(settings, **kwargs):
        if settings["out"].endswith(f"trial-{number:03d}"):
            raise tuning.MedclfError("training produced no usable checkpoint: the model diverged")
        return real(settings, **kwargs)

    monkeypatch.setattr(tuning.training, "train", train)


def test_settings_that_cannot_train_fail_their_trial_and_the_search_goes_on(split_folder, tmp_path, monkeypatch):
    _failing_trial(monkeypatch, 1)
    out = tmp_path / "diverged"
    result = tuning.tune(str(split_folder), trials=2, out=str(out), folds=0, epochs=1, batch_size=16,
                         model="resnet18", cache=False, progress=False)
    states = [t.state for t in trials_of(out)]
    assert states == [TrialState.COMPLETE, TrialState.FAIL] and result["trials"] == 2  # the failure counts
    assert "diverged" in trials_of(out)[1].user_attrs["error"] and result["best"]["trial"] == 0
    assert "diverged" in (out / "tune.html").read_text()


def test_a_default_that_cannot_train_is_one_line_and_exit_2(split_folder, tmp_path, monkeypatch, capsys):
    _failing_trial(monkeypatch, 0)
    out = tmp_path / "broken"
    assert main(["tune", str(split_folder), "--trials", "3", "--out", str(out), "--folds", "0", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "default settings (trial 0) do not train" in err[0] and "diverged" in err[0]
    assert [t.state for t in trials_of(out)] == [TrialState.FAIL]


def test_import_medclf_does_not_import_optuna():
    code = "import sys, medclf; print(','.join(m for m in ('optuna', 'sqlalchemy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == ""
