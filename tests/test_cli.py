"""End to end through the command line: train → evaluate → predict on tiny generated data."""
import csv
import json

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score, roc_auc_score

from medclf.cli import main
from medclf.data.augment import PRESETS

from conftest import FAST_FLAGS, interrupt_second_epoch, make_split_folder, write_class_folders


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    data = make_split_folder(base / "xray")
    run = base / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--out", str(run)]) == 0
    return data, run


def test_train_writes_the_whole_run_directory(trained):
    _, run = trained
    for name in ("config.yaml", "history.csv", "metrics.json", "model.pt", "last.pt", "curves.png",
                 "confusion_matrix.png", "roc.png", "splits.csv"):
        assert (run / name).is_file(), name
    history = list(csv.DictReader(open(run / "history.csv")))
    assert len(history) == 2
    assert {"epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds"} <= set(history[0])
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("accuracy", "balanced_accuracy", "auc", "f1_macro", "per_class", "confusion_matrix"):
            assert key in metrics[split]
        assert set(metrics[split]["per_class"]["NORMAL"]) >= {"precision", "recall", "specificity", "f1"}
    assert "threshold" in metrics["test"]  # binary: metrics at the validation-chosen threshold too
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["size"] == 12 and config["stem"] == "small" and config["channels"] == 1
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["classes"] == ["NORMAL", "PNEUMONIA"] and ckpt["input_size"] == 12
    assert ckpt["crop"] == pytest.approx(PRESETS[config["augment"]].eval_crop) and ckpt["crop"] < 1


def test_evaluate_reproduces_the_runs_validation_metrics(trained, tmp_path):
    # training's validation and `evaluate` must preprocess alike (size, centre crop, channels)
    data, run = trained
    saved = json.loads((run / "metrics.json").read_text())["val"]
    assert main(["evaluate", str(run), str(data), "--split", "val", "--out", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())["val"]
    assert again["accuracy"] == pytest.approx(saved["accuracy"]) and again["auc"] == pytest.approx(saved["auc"])


def test_predictions_csv_reproduces_evaluate(trained, tmp_path, capsys):
    data, run = trained
    assert main(["evaluate", str(run), str(data), "--split", "test", "--out", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())["test"]
    assert main(["predict", str(run), str(data), "--split", "test", "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["path", "label", "prediction", "prob_NORMAL", "prob_PNEUMONIA"]
    y = np.array([r["label"] == "PNEUMONIA" for r in rows], int)
    p = np.array([float(r["prob_PNEUMONIA"]) for r in rows])
    pred = np.array([r["prediction"] == "PNEUMONIA" for r in rows], int)
    assert accuracy_score(y, pred) == pytest.approx(result["accuracy"])
    assert roc_auc_score(y, p) == pytest.approx(result["auc"])


def test_evaluate_and_predict_on_a_test_only_folder(trained, tmp_path):
    _, run = trained
    only = write_class_folders(tmp_path / "only" / "test", {"NORMAL": 4, "PNEUMONIA": 4}, seed=9).parent
    assert main(["evaluate", str(run), str(only), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["test"]["n"] == 8
    assert main(["predict", str(run), str(only / "test"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 8 and {r["label"] for r in rows} == {"NORMAL", "PNEUMONIA"}  # labels from folder names


def test_predict_single_files_without_labels(trained, tmp_path):
    data, run = trained
    files = sorted((data / "test" / "NORMAL").glob("*.png"))[:2]
    assert main(["predict", str(run / "model.pt"), *map(str, files), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 2 and abs(float(rows[0]["prob_NORMAL"]) + float(rows[0]["prob_PNEUMONIA"]) - 1) < 1e-5


def test_config_rerun_and_flag_override(trained, tmp_path):
    data, run = trained
    out = tmp_path / "again"
    assert main(["train", "--config", str(run / "config.yaml"), "--epochs", "1", "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["epochs"] == 1 and config["data"] == str(data)
    assert len(list(csv.DictReader(open(out / "history.csv")))) == 1


def test_existing_run_directory_is_not_overwritten(trained, capsys):
    data, run = trained
    before = (run / "model.pt").read_bytes()
    assert main(["train", str(data), "--out", str(run), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medclf: error: run directory") and "--force" in err and "\n" not in err
    assert (run / "model.pt").read_bytes() == before


def test_interrupt_then_resume(tmp_path, monkeypatch, capsys):
    from medclf import training as train_module


    data = make_split_folder(tmp_path / "d")
    real = interrupt_second_epoch(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "3", "--out", str(run)]) == 130  # Ctrl-C, as shells expect
    assert "resume with `medclf train --resume" in capsys.readouterr().err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert main(["train", "--resume", str(run)]) == 0
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert (run / "metrics.json").is_file()


def test_npz_train_and_predict_by_index(npz_file, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(npz_file), *FAST_FLAGS, "--epochs", "1", "--augment", "strong", "--out", str(run)]) == 0
    assert main(["predict", str(run), str(npz_file), "--split", "test", "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0])[:3] == ["index", "label", "prediction"] and len(rows) == 18


def test_finetune_from_medclf_model_with_other_classes(npz_file, trained, tmp_path):
    """A 3-class 16 px npz model starts a 2-class 12 px folder task: stem and normalisation inherited, the size the data's."""
    _, run2 = trained
    data = make_split_folder(tmp_path / "d")
    base = tmp_path / "base"
    assert main(["train", str(npz_file), *FAST_FLAGS, "--epochs", "1", "--out", str(base)]) == 0
    out = tmp_path / "ft"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--weights", str(base / "model.pt"),
                 "--finetune", "head", "--out", str(out)]) == 0
    b = torch.load(base / "model.pt", weights_only=True)
    f = torch.load(out / "model.pt", weights_only=True)
    assert f["input_size"] == 12 and f["num_classes"] == 2 and f["stem"] == b["stem"] and f["mean"] == b["mean"]
    # head-only fine-tuning: the backbone weights are exactly those of the base model
    assert torch.equal(f["state_dict"]["layer3.0.conv1.weight"], b["state_dict"]["layer3.0.conv1.weight"])
    assert not torch.equal(f["state_dict"]["fc.weight"][:2], b["state_dict"]["fc.weight"][:2])


@pytest.mark.parametrize("argv_tail,message", [
    (["train", "/no/such/data"], "data not found: /no/such/data"),
    (["evaluate", "/no/run", "/no/data"], "model not found"),
    (["train", "DATA", "--model", "resnet18", "--size", "4"], "--size must be >= 8"),
])
def test_bad_input_is_one_line_exit_2(argv_tail, message, tmp_path, capsys):
    argv = [a.replace("DATA", str(make_split_folder(tmp_path / "d"))) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_evaluate_data_with_classes_the_model_lacks(trained, tmp_path, capsys):
    _, run = trained
    other = write_class_folders(tmp_path / "o" / "test", {"COVID": 2}, seed=4).parent
    assert main(["evaluate", str(run), str(other)]) == 2
    assert "COVID" in capsys.readouterr().err


def test_evaluate_npz_labels_out_of_range(trained, npz_file, capsys):
    _, run = trained
    assert main(["evaluate", str(run), str(npz_file)]) == 2
    assert "labels out of range" in capsys.readouterr().err


def test_corrupt_image_error_then_skip_bad(tmp_path, capsys):
    data = make_split_folder(tmp_path / "d")
    (data / "train" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8 truncated")
    assert main(["train", str(data), *FAST_FLAGS, "--out", str(tmp_path / "r1")]) == 2
    assert "broken.jpeg" in capsys.readouterr().err
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--skip-bad", "--out", str(tmp_path / "r2")]) == 0
    assert "broken.jpeg" in (tmp_path / "r2" / "skipped.txt").read_text()
