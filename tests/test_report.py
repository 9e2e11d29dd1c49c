"""report.html (written by train, re-made by `medclf report`) and `medclf explain` on tiny models."""
import contextlib
import csv
import html
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medclf import models
from medclf.cli import main
from medclf.metrics import METHOD_VAL, SMALL_ESTIMATE_N, estimate
from medclf.reporting.html import fmt
from medclf.reporting.run_report import report
from medclf.stats import sampled_test_accuracy_range

from conftest import FAST_FLAGS, make_image, make_split_folder, write_class_folders
from foldsrun import fake_folds_run
from htmlcheck import needs_chromium, assert_self_contained, check_numbers, injected, parse, render


@pytest.fixture(scope="module")
def run_without_report(tmp_path_factory):
    """A run whose report failed during training: the run must survive, and `medclf report` make it."""
    from medclf.reporting import run_report as report_module
    base = tmp_path_factory.mktemp("report")
    data = make_split_folder(base / "xray")
    run = base / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("report exploded")

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(report_module, "report", broken)
        assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    return data, run, printed.getvalue()


def test_report_failure_never_loses_the_run(run_without_report):
    _, run, printed = run_without_report
    assert (run / "metrics.json").is_file() and (run / "model.pt").is_file()
    assert not (run / "report.html").exists()
    assert "warning: report.html not written (RuntimeError: report exploded)" in printed
    assert f"medclf report {run}" in printed


def test_report_command_numbers_equal_metrics_json(run_without_report, capsys):
    _, run, _ = run_without_report
    assert main(["report", str(run)]) == 0
    assert "report →" in capsys.readouterr().out
    text = (run / "report.html").read_text()
    assert_self_contained(text)
    metrics = json.loads((run / "metrics.json").read_text())
    assert check_numbers(text, metrics) >= 30  # headline, threshold and per-class numbers of val and test
    keys = {tuple(k) for k, _, _ in parse(text).found}
    for split in ("val", "test"):
        assert (split, "auc") in keys and (split, "per_class", "PNEUMONIA", "specificity") in keys
    for heading in ("95% confidence intervals", "Sensitivity and specificity", "Calibration",
                    "Grad-CAM", "Dataset", "Resolved configuration", "precision-recall"):
        assert heading in text, heading
    # dataset summary: the counts of splits.csv
    rows = list(csv.DictReader(open(run / "splits.csv")))
    assert f"<td>{sum(r['split'] == 'train' for r in rows)}</td>" in text
    # as many mistake cards as test mistakes (up to 8), each with an image and its Grad-CAM overlay
    wrong = metrics["test"]["n"] - round(metrics["test"]["accuracy"] * metrics["test"]["n"])
    assert text.count('class="card"') == min(wrong, 8)


def test_report_with_moved_data_and_other_out(run_without_report, tmp_path, capsys):
    data, run, _ = run_without_report
    assert main(["report", str(run), "--data", str(data), "--out", str(tmp_path / "r.html")]) == 0
    assert "Most confident mistakes" in (tmp_path / "r.html").read_text()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no model.pt" in capsys.readouterr().err


@needs_chromium
def test_report_renders_in_chromium(run_without_report, tmp_path):
    _, run, _ = run_without_report
    if not (run / "report.html").is_file():
        assert main(["report", str(run)]) == 0
    page = run / "report.html"
    dom, images = render(page, tmp_path)
    assert len(images) == len(parse(page.read_text()).images) >= 6
    assert all(complete and w > 0 and h > 0 for complete, w, h in images), images
    check_numbers(dom, json.loads((run / "metrics.json").read_text()))  # the numbers the browser shows


# ---------------------------------------------------------------- the estimate leads the report

def _sections(text: str) -> list[str]:
    return [h.split("</h2>")[0] for h in text.split("<h2>")[1:]]


def _estimate_section(text: str) -> str:
    return text.split('<section id="estimate">')[1].split("</section>")[0]


def test_old_run_report_estimates_from_val_and_says_it_is_optimistic(run_without_report, tmp_path):
    """A metrics.json without "estimate" (runs made before it): the report computes one from val, optimistic."""
    _, run, _ = run_without_report
    old = tmp_path / "old"
    shutil.copytree(run, old)
    saved = json.loads((old / "metrics.json").read_text())
    saved.pop("estimate", None)
    (old / "metrics.json").write_text(json.dumps(saved))
    text = open(report(old)).read()
    assert _sections(text)[0] == "What to expect on new images"
    section = _estimate_section(text)
    assert "older medclf" in section and "data-key" not in section  # its numbers are not in metrics.json
    assert f"<td>accuracy</td><td><span class=\"num\">{fmt(saved['val']['accuracy'])}</span>" in section
    assert "chose the checkpoint" in section and "<b>optimistic</b>" in section
    assert f"rests on {saved['val']['n']} images (fewer than {SMALL_ESTIMATE_N})" in section
    check_numbers(text, saved)


def test_report_shows_the_estimate_of_metrics_json(run_without_report, tmp_path):
    _, run, _ = run_without_report
    unbiased = tmp_path / "unbiased"
    shutil.copytree(run, unbiased)
    saved = json.loads((unbiased / "metrics.json").read_text())
    rng = np.random.default_rng(0)
    y = np.arange(300) % 2
    saved["estimate"] = estimate(y, rng.dirichlet([1, 1], 300), ["NORMAL", "PNEUMONIA"], METHOD_VAL, n_boot=50)
    (unbiased / "metrics.json").write_text(json.dumps(saved))
    text = open(report(unbiased)).read()
    keys = [k for k, _, _ in parse(_estimate_section(text)).found]
    assert len(keys) == 4 * 3 + 1 and ["estimate", "auc", "ci95", 1] in keys and ["estimate", "n"] in keys
    check_numbers(text, saved)
    section = _estimate_section(text)
    assert "unbiased" in section and "optimistic" not in section and 'class="note"' not in section
    # what a user's own test set will show: the sampled range of its accuracy, from the estimate, per size
    acc = saved["estimate"]["accuracy"]
    for m in (100, 500):
        low, high = sampled_test_accuracy_range(acc["value"], acc["ci95"], m)
        assert f"of {m} images, between {low:.3f} and {high:.3f}" in section


@pytest.fixture(scope="module")
def folds_run(run_without_report, tmp_path_factory):
    _, run, _ = run_without_report
    return fake_folds_run(run, tmp_path_factory.mktemp("folds") / "run", ["NORMAL", "PNEUMONIA"])


def test_folds_run_report_reads_out_of_fold_predictions_and_predicts_only_test(folds_run, monkeypatch):
    from medclf import inference
    from medclf.reporting import run_report as report_module

    predicted = []
    real = inference.split_store

    def recording(ckpt, data, split, *args, **kwargs):
        predicted.append(split)
        return real(ckpt, data, split, *args, **kwargs)

    monkeypatch.setattr(report_module.inference, "split_store", recording)
    text = open(report(folds_run)).read()
    assert predicted == ["test"]  # the ensemble trained on val: its images come from oof.csv, never re-predicted
    saved = json.loads((folds_run / "metrics.json").read_text())
    keys = {tuple(k) for k, _, _ in parse(text).found}
    assert check_numbers(text, saved) >= 13 + 30
    assert ("oof", "auc") in keys and ("test", "auc") in keys and ("estimate", "f1_macro", "value") in keys
    assert not any(k[0] == "val" for k in keys)
    assert _sections(text)[0] == "What to expect on new images"
    section = _estimate_section(text)
    assert "out-of-fold, K=3 cross-validation" in section and "optimistic" not in section
    assert f"rests on {saved['estimate']['n']} images" in section
    assert "out-of-fold (n=" in text


def _without(folds_run, dest, *keys: str) -> dict:
    """A copy of the folds run whose metrics.json lacks `keys`; returns that metrics.json."""
    shutil.copytree(folds_run, dest)
    saved = json.loads((dest / "metrics.json").read_text())
    for key in keys:
        del saved[key]
    (dest / "metrics.json").write_text(json.dumps(saved))
    return saved


def test_folds_run_without_test_shows_out_of_fold_mistakes(folds_run, tmp_path):
    run = tmp_path / "run"
    saved = _without(folds_run, run, "test", "estimate")
    stores = {}  # no test split
    text = open(report(run, stores=stores)).read()
    check_numbers(text, saved)
    section = _estimate_section(text)  # made here, from oof.csv
    assert "out-of-fold, K=3 cross-validation" in section and "from its out-of-fold predictions" in section
    assert "wrong out-of-fold predictions" in text and "fold model" in text
    wrong = saved["oof"]["n"] - round(saved["oof"]["accuracy"] * saved["oof"]["n"])
    assert text.count("<td>train</td>") + text.count("<td>val</td>") == min(wrong, 8)


def test_train_writes_the_outputs_of_a_folds_run_without_test(folds_run, tmp_path, capsys):
    """What `train --folds` hands over for data without a test split: results and curves of "oof" only."""
    from medclf.oof import read_oof
    from medclf.reporting.run_report import write_run_outputs

    run = tmp_path / "run"
    saved = _without(folds_run, run, "test")
    for name in ("report.html", "roc.png", "confusion_matrix.png"):
        (run / name).unlink(missing_ok=True)
    oof = read_oof(run)
    write_run_outputs(run, saved, {"oof": (oof.labels, oof.probs)}, oof.classes, {"oof": None}, "cpu")
    assert "warning" not in capsys.readouterr().out
    assert all((run / name).is_file() for name in ("report.html", "roc.png", "confusion_matrix.png"))


@needs_chromium
def test_folds_run_report_renders_in_chromium(folds_run, tmp_path):
    page = report(folds_run, out=tmp_path / "report.html")
    dom, images = render(tmp_path / "report.html", tmp_path)
    assert all(complete and w > 0 for complete, w, _ in images), images
    assert check_numbers(dom, json.loads((folds_run / "metrics.json").read_text())) >= 13
    assert "What to expect on new images" in dom and page.endswith("report.html")


def test_explain_matches_predict(run_without_report, tmp_path, capsys):
    data, run, _ = run_without_report
    files = sorted((data / "test" / "PNEUMONIA").glob("*.png"))[:3]
    out = tmp_path / "cams"
    assert main(["explain", str(run), *map(str, files), "--out", str(out)]) == 0
    assert main(["predict", str(run), *map(str, files), "--out", str(tmp_path / "p.csv")]) == 0
    predicted = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    rows = list(csv.DictReader(open(out / "explain.csv")))
    assert [r["path"] for r in rows] == list(map(str, files))
    for r in rows:
        assert r["prediction"] == predicted[r["path"]]["prediction"]
        assert float(r["probability"]) == pytest.approx(float(predicted[r["path"]][f"prob_{r['prediction']}"]), abs=1e-6)
        assert r["gradcam"].endswith(".gradcam.png") and r["label"] == "PNEUMONIA"
        with Image.open(r["gradcam"]) as img:
            assert img.format == "PNG" and img.size == (600, 330)  # image and overlay side by side, titled
    assert main(["explain", str(run), str(files[0]), "--class", "NORMAL", "--out", str(out)]) == 0
    assert list(csv.DictReader(open(out / "explain.csv")))[0]["explained_class"] == "NORMAL"
    assert main(["explain", str(run), str(files[0]), "--class", "COVID"]) == 2
    assert "COVID" in capsys.readouterr().err


@pytest.mark.parametrize("arch,stem,chans,size", [("resnet18", "small", 1, 12), ("resnet34", "imagenet", 3, 32),
                                                  ("resnet50", "small", 3, 16)])
def test_explain_any_architecture(arch, stem, chans, size, tmp_path):
    """Untrained checkpoints of every supported shape: explain needs no training to be exercised."""
    torch.manual_seed(0)
    model = models.build_model(arch, 2, chans, stem)
    spec = models.model_spec(arch, ["a", "b"], chans, stem, size, [0.5] * chans, [0.5] * chans)
    torch.save(models.checkpoint_dict(model, spec), tmp_path / "model.pt")
    images = write_class_folders(tmp_path / "imgs", {"a": 1, "b": 1}, size=size, mode="L" if chans == 1 else "RGB")
    out = tmp_path / "cams"
    assert main(["explain", str(tmp_path / "model.pt"), str(images), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "explain.csv")))
    assert len(rows) == 2 and {r["label"] for r in rows} == {"a", "b"}
    assert sorted(p.name for p in out.glob("*.png")) == ["a_0.gradcam.png", "b_0.gradcam.png"]
    for r in rows:
        assert 0.0 <= float(r["probability"]) <= 1.0
        with Image.open(r["gradcam"]) as img:
            assert np.asarray(img.convert("RGB")).std() > 0


def test_train_writes_the_report_for_a_three_class_npz(npz_file, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(npz_file), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    text = (run / "report.html").read_text()
    assert_self_contained(text)
    metrics = json.loads((run / "metrics.json").read_text())
    estimated = sum(k[0] == "estimate" for k, _, _ in parse(text).found)
    assert estimated == (4 * 3 + 1 if "estimate" in metrics else 0)  # value and CI per headline metric, n
    # val and test: headline + 5 per class; no threshold with 3 classes
    assert check_numbers(text, metrics) == 2 * (4 + 3 * 5) + estimated
    assert "at threshold" not in text and "row " in text  # npz mistakes are named by their row


HOSTILE = ("<img src=x onerror=alert(1)>", "dose$\\foo$")  # HTML injection; mathtext that matplotlib cannot parse


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = write_class_folders(root / "data", {name: 20 for name in HOSTILE})
    run = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    return data, run, printed.getvalue()


def test_class_names_from_data_never_break_a_run(hostile_run, tmp_path):
    data, run, printed = hostile_run
    assert "warning" not in printed
    for name in ("metrics.json", "curves.png", "confusion_matrix.png", "roc.png", "report.html"):
        assert (run / name).is_file(), name
    assert set(json.loads((run / "metrics.json").read_text())["test"]["per_class"]) == set(HOSTILE)
    image = next((data / HOSTILE[1]).glob("*.png"))
    assert main(["explain", str(run), str(image), "--out", str(tmp_path / "cams")]) == 0  # the title names the class
    assert list(csv.DictReader(open(tmp_path / "cams" / "explain.csv")))[0]["label"] == HOSTILE[1]


def test_class_names_are_escaped_in_the_report(hostile_run):
    _, run, _ = hostile_run
    text = (run / "report.html").read_text()
    assert injected(text) == [] and HOSTILE[0] not in text
    assert html.escape(HOSTILE[0]) in text


@needs_chromium
def test_class_names_show_as_text_in_chromium(hostile_run, tmp_path):
    _, run, _ = hostile_run
    dom, images = render(run / "report.html", tmp_path)
    assert [e for e in injected(dom) if e[0] != "script"] == []  # the only script is the test's own probe
    assert dom.count("<script") == 1
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom and "dose$\\foo$" in dom  # shown as written, as text


def test_three_class_model_on_two_classes_agrees_everywhere(tmp_path):
    """metrics.json, history.csv, the report and compare give one AUC and macro F1 when a class is absent."""
    from medclf.comparison import evaluate_arms

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        labels = np.arange(n) % (3 if split == "train" else 2)  # class 2 occurs in train only
        arrays[f"{split}_images"] = np.stack([make_image(int(c), 16, rng) for c in labels])
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(tmp_path / "partial.npz", **arrays)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "partial.npz"), *FAST_FLAGS, "--epochs", "1", "--no-plan",
                 "--out", str(run)]) == 0
    saved = json.loads((run / "metrics.json").read_text())
    history = list(csv.DictReader(open(run / "history.csv")))
    assert saved["val"]["auc"] is not None and saved["test"]["auc"] is not None
    assert float(history[-1]["val_auc"]) == pytest.approx(saved["val"]["auc"], abs=1e-6)
    assert float(history[-1]["val_f1_macro"]) == pytest.approx(saved["val"]["f1_macro"], abs=1e-6)
    text = (run / "report.html").read_text()
    check_numbers(text, saved)
    assert ["test", "auc"] in [k for k, _, _ in parse(text).found] and "with a ROC AUC of" in text
    result, pooled, labels, _ = evaluate_arms(str(tmp_path / "partial.npz"), {"a": [run], "b": [run]},
                                              {"a": {}, "b": {}}, [0], {}, n_boot=10)
    for name in ("auc", "f1_macro", "balanced_accuracy"):
        assert result["arms"]["a"]["metrics"][name]["values"] == [pytest.approx(saved["test"][name], abs=1e-6)]
        assert result["arms"]["a"]["pooled"][name] == pytest.approx(saved["test"][name], abs=1e-6)


def test_a_figure_that_fails_costs_only_that_figure(tmp_path, monkeypatch):
    from medclf.reporting import figures

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(figures, "roc_figure", broken)
    (tmp_path / "history.csv").write_text("epoch,train_loss,val_loss,val_accuracy\n1,0.7,0.6,0.5\n")
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.9, 0.1]])
    problems = figures.save_run_plots(tmp_path, tmp_path / "history.csv", [[1, 1], [1, 1]], ["a", "b"],
                                      labels, probs, split="test")
    assert problems == ["roc.png not written (ValueError: cannot draw)"]
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "confusion_matrix.png").is_file()
    assert not (tmp_path / "roc.png").exists()
