"""`medclf train --folds K`: folds that hold every image out once, an honest out-of-fold estimate, an ensemble
that every command accepts, --refit, --resume and --force on cross-validated runs."""
import json
import shutil

import numpy as np
import pytest
import torch

import medclf
from medclf import crossval, training
from medclf.cli import main
from medclf.data import splits
from medclf.errors import MedclfError
from medclf.oof import read_oof

from conftest import write_class_folders

FOLD_FLAGS = ["--epochs", "1", "--batch-size", "16", "--size", "16"]


def _data(root):
    write_class_folders(root / "train", {"NORMAL": 12, "PNEUMONIA": 12}, seed=1)
    write_class_folders(root / "val", {"NORMAL": 3, "PNEUMONIA": 3}, seed=2)
    write_class_folders(root / "test", {"NORMAL": 4, "PNEUMONIA": 4}, seed=3)
    return root


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    data = _data(root / "d")
    run = root / "run"
    assert main(["train", str(data), "--folds", "3", *FOLD_FLAGS, "--out", str(run)]) == 0
    return data, run


def test_every_train_and_val_image_is_held_out_exactly_once(folds_run):
    data, run = folds_run
    oof = read_oof(run)
    assert len(oof.ids) == 30 and len(set(oof.ids)) == 30 and set(oof.folds) == {1, 2, 3}
    assert {s for s, _ in oof.ids} == {"train", "val"}
    assert np.allclose(oof.probs.sum(1), 1, atol=1e-4)
    # each row is the prediction of the fold model that did not train on it
    held = [i for i, f in enumerate(oof.folds) if f == 2]
    paths = [oof.ids[i][1] for i in held]
    rows = medclf.predict(str(run / "fold-2"), paths, out=None)
    assert np.allclose([[r["prob_NORMAL"], r["prob_PNEUMONIA"]] for r in rows], oof.probs[held], atol=1e-4)


def test_the_estimate_is_out_of_fold_with_a_confidence_interval(folds_run):
    _, run = folds_run
    metrics = json.loads((run / "metrics.json").read_text())
    est = metrics["estimate"]
    assert est["method"] == "out-of-fold, K=3" and est["n"] == 30
    for name in ("accuracy", "balanced_accuracy", "auc", "f1_macro"):
        value, (lo, hi) = est[name]["value"], est[name]["ci95"]
        assert lo <= value <= hi
    assert est["accuracy"]["value"] == pytest.approx(metrics["oof"]["accuracy"])
    assert "val" not in metrics and "test" in metrics  # the ensemble trained on val; test is held out from all


def test_the_run_model_is_the_fold_ensemble_and_every_command_takes_it(folds_run, tmp_path):
    data, run = folds_run
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["ensemble"] == 3 and ckpt["folds"] == 3
    test_images = sorted(str(p) for p in (data / "test").rglob("*.png"))
    mean = np.mean([[[r["prob_NORMAL"], r["prob_PNEUMONIA"]] for r in medclf.predict(str(run / f"fold-{f}"), test_images, out=None)]
                    for f in (1, 2, 3)], axis=0)
    ens = medclf.predict(str(run), test_images, out=None)
    assert np.allclose([[r["prob_NORMAL"], r["prob_PNEUMONIA"]] for r in ens], mean, atol=1e-4)
    evaluated = medclf.evaluate(str(run), str(data), split="test")
    assert evaluated["test"]["accuracy"] == pytest.approx(json.loads((run / "metrics.json").read_text())["test"]["accuracy"])
    assert main(["explain", str(run), test_images[0], "--out", str(tmp_path / "cams")]) == 0
    assert list((tmp_path / "cams").glob("*.png"))
    report = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(report)]) == 0
    assert "out-of-fold" in report.read_text()


def test_folds_group_a_patients_images_together():
    names = [f"person{p}_bacteria_{i}.jpeg" for p in range(12) for i in range(3)]
    labels = np.array([p % 2 for p in range(12) for _ in range(3)])
    groups = splits.patient_groups(names)
    fold = crossval.assign_folds(labels, groups, 3, seed=0)
    for patient in set(groups):
        assert len({fold[i] for i, g in enumerate(groups) if g == patient}) == 1
    assert all(np.bincount(labels[fold == f]).min() > 0 for f in range(3))  # still stratified


def test_fewer_patients_than_folds_is_refused_not_silently_ungrouped():
    names = [f"person{p}_bacteria_{i}.jpeg" for p in range(3) for i in range(4)]  # 3 patients, 12 images
    labels = np.array([0, 1] * 6)
    with pytest.raises(MedclfError, match="--folds 4 needs at least 4 patients/groups"):
        crossval.assign_folds(labels, splits.patient_groups(names), 4, seed=0)


def test_too_few_images_for_the_folds_is_one_line():
    with pytest.raises(MedclfError, match="--folds 5 needs at least 5 images of every class"):
        crossval.assign_folds(np.array([0, 0, 0, 1, 1, 1, 1, 1]), None, 5, seed=0)


def test_refit_trains_one_model_on_everything(tmp_path):
    data = _data(tmp_path / "d")
    run = tmp_path / "run"
    assert main(["train", str(data), "--folds", "2", "--refit", *FOLD_FLAGS, "--out", str(run)]) == 0
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert "ensemble" not in ckpt and ckpt["folds"] == 2
    assert (run / "refit" / "model.pt").is_file()
    assert json.loads((run / "metrics.json").read_text())["estimate"]["method"] == "out-of-fold, K=2"
    assert main(["train", str(data), "--folds", "2", "--refit", *FOLD_FLAGS, "--out", str(run)]) == 2  # no --force
    assert main(["train", str(data), "--folds", "2", *FOLD_FLAGS, "--out", str(run), "--force"]) == 0
    assert not (run / "refit").exists()  # --force replaced the whole run, its sub-runs included


def test_resume_continues_with_the_interrupted_fold(tmp_path, monkeypatch):
    data = _data(tmp_path / "d")
    run = tmp_path / "run"
    real_fit = training.fit
    calls = []

    def interrupted_in_fold_2(cfg, spec, base, train_store, val_store, out, *args, **kwargs):
        calls.append(out.name)
        if out.name == "fold-2":
            raise KeyboardInterrupt
        return real_fit(cfg, spec, base, train_store, val_store, out, *args, **kwargs)

    monkeypatch.setattr(training, "fit", interrupted_in_fold_2)
    assert main(["train", str(data), "--folds", "3", *FOLD_FLAGS, "--out", str(run)]) == 130
    monkeypatch.setattr(training, "fit", lambda *a, **k: (calls.append(a[5].name), real_fit(*a, **k))[1])
    assert main(["train", "--resume", str(run)]) == 0
    assert calls == ["fold-1", "fold-2", "fold-2", "fold-3"]  # fold 1 was finished and is not trained again
    assert len(read_oof(run).ids) == 30


def test_force_leaves_a_fold_folder_with_foreign_files_alone(folds_run, tmp_path, capsys):
    data, run = folds_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "fold-1" / "notes.txt").write_text("mine")
    assert main(["train", str(data), "--folds", "3", *FOLD_FLAGS, "--out", str(copy), "--force"]) == 2
    assert "is not a medclf run (fold-1)" in capsys.readouterr().err
    assert (copy / "fold-1" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flags,message", [(["--folds", "1"], "--folds must be 0"),
                                           (["--refit", "--folds", "0"], "--refit retrains on everything")])
def test_meaningless_fold_settings_are_one_line(tmp_path, capsys, flags, message):
    data = _data(tmp_path / "d")
    assert main(["train", str(data), *FOLD_FLAGS, *flags, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
