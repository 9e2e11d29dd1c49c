"""`medclf compare`: comparison.json schema, statistics wiring on known answers, the HTML page."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from medclf import metrics as M
from medclf import models
from medclf.cli import main
from medclf.comparison import evaluate_arms, fixed_splits, pair_tests, resolve_arms, summary_text
from medclf.data import sources
from medclf.errors import MedclfError
from medclf.oof import read_oof
from medclf.stats import delong_auc_test, mcnemar_test

from conftest import FAST_FLAGS, make_split_folder, write_class_folders
from foldsrun import fake_folds_run
from htmlcheck import CHROMIUM, REQUIRED, needs_chromium, assert_self_contained, check_numbers, injected, parse, render

PAIR_KEYS = {"a", "b", "metric", "difference", "ci95", "p_value"}


def _probs(y: np.ndarray, k: int, wrong: np.ndarray, confidence: float = 0.8) -> np.ndarray:
    """Probabilities that pick the true class except where `wrong` (then the next class)."""
    pred = np.where(wrong, (y + 1) % k, y)
    p = np.full((len(y), k), (1 - confidence) / (k - 1))
    p[np.arange(len(y)), pred] = confidence
    return p


# ---------------------------------------------------------------- statistics on known answers

def test_identical_arms_differ_by_zero_with_p_one():
    rng = np.random.default_rng(0)
    y = np.arange(30) % 2
    p = rng.dirichlet([1, 1], size=30)
    rows = pair_tests(y, p, p.copy(), ["NORMAL", "PNEUMONIA"], "a", "b")
    assert [r["metric"] for r in rows] == ["accuracy", "balanced_accuracy", "auc", "f1_macro", "recall_NORMAL",
                                           "recall_PNEUMONIA"]
    for r in rows:
        assert PAIR_KEYS <= set(r)
        assert r["difference"] == 0 and r["ci95"] == [0.0, 0.0] and r["p_value"] == 1.0, r


def test_accuracy_by_mcnemar_and_auc_by_delong():
    y = np.arange(40) % 2
    pa = _probs(y, 2, np.zeros(40, bool))
    wrong = (y == 0) & (np.arange(40) < 20)  # b errs on 10 NORMAL images a gets right, never the other way round
    pb = _probs(y, 2, wrong, confidence=0.7)
    rows = {r["metric"]: r for r in pair_tests(y, pa, pb, ["n", "p"], "a", "b", n_boot=500)}
    acc = rows["accuracy"]
    assert acc["difference"] == pytest.approx(10 / 40)
    assert acc["p_value"] == pytest.approx(2 * 0.5 ** 10)  # exact two-sided binomial on 10 discordant pairs
    assert acc["ci95"][0] > 0 and "McNemar" in acc["method"]
    diff, p, ci = delong_auc_test(y, pa[:, 1], pb[:, 1])
    assert rows["auc"]["difference"] == pytest.approx(roc_auc_score(y, pa[:, 1]) - roc_auc_score(y, pb[:, 1]))
    assert (rows["auc"]["difference"], rows["auc"]["p_value"], rows["auc"]["ci95"]) == (diff, p, list(ci))
    assert rows["auc"]["method"].startswith("DeLong")
    assert rows["recall_n"]["difference"] == pytest.approx(10 / 20) and rows["recall_n"]["p_value"] < 0.05
    assert rows["recall_p"]["difference"] == 0 and rows["recall_p"]["p_value"] == 1.0


def test_multiclass_auc_uses_the_paired_bootstrap():
    rng = np.random.default_rng(1)
    y = np.arange(60) % 3
    pa, pb = rng.dirichlet([1, 1, 1], size=60), rng.dirichlet([1, 1, 1], size=60)
    rows = {r["metric"]: r for r in pair_tests(y, pa, pb, ["x", "y", "z"], "a", "b", n_boot=200)}
    assert "bootstrap" in rows["auc"]["method"]
    assert rows["auc"]["difference"] == pytest.approx(M.auc(y, pa) - M.auc(y, pb))
    assert rows["auc"]["ci95"][0] <= rows["auc"]["difference"] <= rows["auc"]["ci95"][1]


@pytest.mark.parametrize("k,absent", [(2, None), (3, None), (4, 2)])
def test_fast_metrics_equal_scikit_learn(k, absent):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 80)
    if absent is not None:
        y[y == absent] = 0
    p = rng.dirichlet(np.ones(k), size=80)
    p[:5] = p[5]  # ties
    classes = [f"c{i}" for i in range(k)]
    reference = M.metric_values(M.classification_metrics(y, p, classes), classes)
    for name, f in M.metric_functions(classes).items():
        if name == f"recall_c{absent}":
            assert np.isnan(f(y, p))  # undefined without positives (scikit-learn reports 0)
            continue
        assert f(y, p) == pytest.approx(reference[name], abs=1e-12), name


def test_summary_names_the_better_arm_and_significance():
    y = np.arange(200) % 2
    good, bad = _probs(y, 2, np.zeros(200, bool)), _probs(y, 2, np.arange(200) < 60, confidence=0.6)
    metric = {"mean": 0.9, "std": 0.01, "values": [0.9]}
    arms = {"pretrained": {"metrics": {"auc": metric, "accuracy": metric}},
            "scratch": {"metrics": {"auc": {**metric, "mean": 0.7}, "accuracy": {**metric, "mean": 0.7}}}}
    result = {"arms": arms, "pairwise": pair_tests(y, bad, good, ["n", "p"], "scratch", "pretrained", n_boot=200),
              "split": "test", "n_images": 200, "classes": ["n", "p"], "seeds": [0, 1, 2]}
    text = summary_text(result)
    assert "pretrained reached the highest mean ROC AUC (0.900 ± 0.010)" in text
    assert "pretrained minus scratch in accuracy is +0.300" in text and "a statistically significant difference" in text


# ---------------------------------------------------------------- arms and splits

def test_arms_from_weights_and_from_yaml(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.pt").write_bytes(b"")
    arms = resolve_arms(f"none,imagenet,{base / 'model.pt'},none", None, {})
    assert list(arms) == ["none", "imagenet", "base", "none-2"]
    assert arms["base"] == {"weights": str(base / "model.pt")}
    (tmp_path / "arms.yaml").write_text(yaml.safe_dump({"head": {"finetune": "head", "label-smoothing": 0},
                                                        "full 64px": {"finetune": "full", "size": 64}}))
    arms = resolve_arms(None, str(tmp_path / "arms.yaml"), {"epochs": 1})
    assert arms == {"head": {"finetune": "head", "label_smoothing": 0}, "full_64px": {"finetune": "full", "size": 64}}
    assert resolve_arms("imagenet", {"a": {}, "b": {"finetune": "head"}}, {})["b"] == {"weights": "imagenet",
                                                                                    "finetune": "head"}


@pytest.mark.parametrize("weights,arms,message", [
    ("none", None, "at least two arms"),
    (None, None, "give the arms"),
    ("none,/no/such/model.pt", None, "weights not found"),
    (None, {"a": {"seed": 1}, "b": {}}, "same for every arm"),
    (None, {"a": {"finetune": "half"}, "b": {}}, "arm 'a': --finetune must be one of"),
    (None, {"a": {"colour": 1}, "b": {}}, "unknown setting"),
])
def test_bad_arms_are_refused_before_training(weights, arms, message):
    with pytest.raises(MedclfError, match=message):
        resolve_arms(weights, arms, {})


def test_seed_dependent_splits_are_made_once(tmp_path):
    classes_only = write_class_folders(tmp_path / "mednist", {"Hand": 20, "CXR": 20})
    data, note = fixed_splits(str(classes_only), tmp_path / "out", 0, 0.1, 0.1)
    fixed = sources.open_source(data)
    generated = sources.open_source(classes_only, seed=0)
    assert set(fixed.splits) == {"train", "val", "test"} and not fixed.generated_splits and "seed 0" in note
    for name, split in generated.splits.items():
        assert sorted(os.path.realpath(p) for p in fixed.splits[name].paths) == sorted(split.paths)
    split_folder = make_split_folder(tmp_path / "xray")
    assert fixed_splits(str(split_folder), tmp_path / "out2", 0, 0.1, 0.1) == (str(split_folder), None)


def test_compare_cli_errors_are_one_line(tmp_path, capsys):
    data = make_split_folder(tmp_path / "d")
    assert main(["compare", str(data), "--weights", "none", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "at least two arms" in err and err.count("\n") == 1


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """none vs an (untrained) earlier medclf model with other classes, 2 seeds × 1 epoch each."""
    root = tmp_path_factory.mktemp("compare")
    data = make_split_folder(root / "xray")
    torch.manual_seed(0)
    spec = models.model_spec("resnet18", ["a", "b", "c"], 1, "small", 12, [0.5], [0.5])
    (root / "base").mkdir()
    torch.save(models.checkpoint_dict(models.build_model("resnet18", 3, 1, "small"), spec), root / "base" / "model.pt")
    out = root / "cmp"
    assert main(["compare", str(data), "--weights", f"none,{root / 'base' / 'model.pt'}", "--seeds", "2",
                 *FAST_FLAGS, "--epochs", "1", "--out", str(out)]) == 0
    return data, out, json.loads((out / "comparison.json").read_text())


def test_comparison_json_schema(compared):
    _, out, result = compared
    assert list(result["arms"]) == ["none", "base"]
    names = {"accuracy", "balanced_accuracy", "auc", "f1_macro", "recall_NORMAL", "recall_PNEUMONIA"}
    for arm, entry in result["arms"].items():
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        assert set(entry["metrics"]) == names
        for run in entry["runs"]:
            assert os.path.basename(run["dir"]) == f"{arm}-seed{run['seed']}"
            assert (out / f"{arm}-seed{run['seed']}" / "report.html").is_file()  # every run has its report
        for name, m in entry["metrics"].items():
            assert set(m) == {"mean", "std", "values"} and len(m["values"]) == 2
            assert m["mean"] == pytest.approx(np.mean(m["values"]))
            assert m["std"] == pytest.approx(np.std(m["values"], ddof=1))
        # per-seed values are the runs' own test metrics
        for k, run in enumerate(entry["runs"]):
            own = json.loads((out / os.path.basename(run["dir"]) / "metrics.json").read_text())["test"]
            assert entry["metrics"]["auc"]["values"][k] == pytest.approx(own["auc"])
            assert entry["metrics"]["recall_NORMAL"]["values"][k] == pytest.approx(own["per_class"]["NORMAL"]["recall"])
    assert result["split"] == "test" and result["n_images"] == 16 and result["seeds"] == [0, 1]
    assert [r["metric"] for r in result["pairwise"]] == ["accuracy", "balanced_accuracy", "auc", "f1_macro",
                                                         "recall_NORMAL", "recall_PNEUMONIA"]
    for r in result["pairwise"]:
        assert PAIR_KEYS <= set(r) and (r["a"], r["b"]) == ("none", "base")
        assert r["difference"] == pytest.approx(r["a_value"] - r["b_value"])
        assert 0 <= r["p_value"] <= 1 and r["ci95"][0] <= r["ci95"][1]
        assert "averaged over its 2 seeds" in r["method"]


def test_pairwise_tests_use_the_seed_averaged_predictions(compared, tmp_path):
    data, out, result = compared
    pooled = {}
    for arm, entry in result["arms"].items():
        probs = []
        for run in entry["runs"]:
            csv_path = tmp_path / f"{arm}{run['seed']}.csv"
            assert main(["predict", run["dir"], str(data), "--split", "test", "--out", str(csv_path)]) == 0
            rows = list(csv.DictReader(open(csv_path)))
            probs.append(np.array([[float(r["prob_NORMAL"]), float(r["prob_PNEUMONIA"])] for r in rows]))
            y = np.array([r["label"] == "PNEUMONIA" for r in rows], int)
        pooled[arm] = np.mean(probs, axis=0)
    rows = {r["metric"]: r for r in result["pairwise"]}
    correct = {arm: p.argmax(1) == y for arm, p in pooled.items()}
    assert rows["accuracy"]["p_value"] == pytest.approx(mcnemar_test(correct["none"], correct["base"]))
    assert rows["accuracy"]["a_value"] == pytest.approx(correct["none"].mean())
    diff, p, _ = delong_auc_test(y, pooled["none"][:, 1], pooled["base"][:, 1])
    assert rows["auc"]["difference"] == pytest.approx(diff, abs=1e-6) and rows["auc"]["p_value"] == pytest.approx(p, abs=1e-6)


def test_comparison_html_is_self_contained_and_matches_the_json(compared):
    _, out, result = compared
    text = (out / "comparison.html").read_text()
    assert_self_contained(text)
    assert len(parse(text).images) == 3  # validation curves, ROC, confusion matrices
    assert check_numbers(text, result) >= 6 * 4 + 6 * 5  # mean±std per arm, every pairwise number
    for heading in ("Summary", "Validation curves", "ROC curves", "All pairwise tests", 'href="none-seed0/report.html"'):
        assert heading in text


@needs_chromium
def test_comparison_renders_in_chromium(compared, tmp_path):
    _, out, result = compared
    dom, images = render(out / "comparison.html", tmp_path)
    assert len(images) == 3 and all(complete and w > 300 and h > 200 for complete, w, h in images), images
    check_numbers(dom, result)


def test_rerun_reuses_finished_runs(compared, capsys):
    data, out, result = compared
    before = (out / "none-seed0" / "model.pt").stat().st_mtime_ns
    assert main(["compare", str(data), "--weights", f"none,{out.parent / 'base' / 'model.pt'}", "--seeds", "2",
                 *FAST_FLAGS, "--epochs", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("reusing it") == 4
    assert (out / "none-seed0" / "model.pt").stat().st_mtime_ns == before
    again = json.loads((out / "comparison.json").read_text())
    assert again["arms"]["none"]["metrics"] == result["arms"]["none"]["metrics"]


def _synthetic_page(tmp_path, classes):
    """The page alone, from synthetic predictions of three arms; (page path, comparison result)."""
    from medclf.serialize import json_safe
    from medclf.reporting.comparison import write_comparison_html
    from medclf.stats import mean_std

    rng = np.random.default_rng(3)
    y = np.arange(45) % 3
    pooled = {arm: _probs(y, 3, rng.random(45) < q) for arm, q in (("a", 0.1), ("b", 0.3), ("c", 0.5))}
    run_dirs, arms = {}, {}
    for arm, p in pooled.items():
        run_dirs[arm] = [tmp_path / f"{arm}-seed0"]
        run_dirs[arm][0].mkdir()
        (run_dirs[arm][0] / "history.csv").write_text("epoch,val_loss,val_auc,val_accuracy\n1,0.9,0.7,0.6\n2,0.8,0.8,0.7\n")
        values = {name: f(y, p) for name, f in M.metric_functions(classes).items()}
        arms[arm] = {"runs": [{"seed": 0, "dir": str(run_dirs[arm][0])}],
                     "metrics": {name: mean_std([v]) for name, v in values.items()}, "flags": {"size": 28}}
    pairwise = [r for a, b in (("a", "b"), ("a", "c"), ("b", "c"))
                for r in pair_tests(y, pooled[a], pooled[b], classes, a, b, n_boot=100)]
    result = json_safe({"arms": arms, "pairwise": pairwise, "split": "test", "n_images": 45, "classes": classes,
                        "seeds": [0], "data": "synthetic"})
    return write_comparison_html(tmp_path, result, run_dirs, y, pooled, classes), result


def test_comparison_page_for_three_classes_and_three_arms(tmp_path):
    """Micro-averaged ROC, a confusion matrix per arm, the pairwise table."""
    page, result = _synthetic_page(tmp_path, ["x", "y", "z"])
    text = page.read_text()
    assert_self_contained(text)
    assert check_numbers(text, result) >= 7 * 3 * 2 + 7 * 3 * 3
    assert text.count("<tr>") > 7 + 21 and "a − c" in text


HOSTILE = ["<img src=x onerror=alert(1)>", "dose$\\foo$", "z"]


def test_comparison_page_escapes_class_names(tmp_path):
    page, _ = _synthetic_page(tmp_path, HOSTILE)
    text = page.read_text()
    assert injected(text) == [] and HOSTILE[0] not in text and "sensitivity (&lt;img src=x" in text
    if CHROMIUM is not None or REQUIRED:
        dom, images = render(page, tmp_path)
        assert [e for e in injected(dom) if e[0] != "script"] == [] and dom.count("<script") == 1
        assert "sensitivity (&lt;img src=x onerror=alert(1)&gt;)" in dom and "sensitivity (dose$\\foo$)" in dom
        assert len(images) == 3 and all(complete and w > 0 for complete, w, _ in images)


# ---------------------------------------------------------------- arms that ran with --folds

@pytest.fixture(scope="module")
def folds_arms(tmp_path_factory):
    """One trained run, and two copies of it dressed as --folds runs with different out-of-fold predictions;
    b's oof.csv rows are shuffled, so comparing them needs aligning by (split, id)."""
    root = tmp_path_factory.mktemp("folds_arms")
    data = make_split_folder(root / "xray")
    run = root / "plain"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    classes = ["NORMAL", "PNEUMONIA"]
    a = fake_folds_run(run, root / "a", classes, seed=1)
    b = fake_folds_run(run, root / "b", classes, seed=2)
    lines = (b / "oof.csv").read_text().splitlines(keepends=True)
    body = lines[1:]
    np.random.default_rng(0).shuffle(body)
    (b / "oof.csv").write_text(lines[0] + "".join(body))
    return data, run, a, b


def _evaluate(data, dirs: dict, n_boot: int = 50):
    return evaluate_arms(str(data), {arm: [d] for arm, d in dirs.items()}, {arm: {} for arm in dirs}, [0], {}, n_boot)


def test_arms_with_folds_are_compared_on_their_out_of_fold_predictions(folds_arms):
    data, _, a, b = folds_arms
    result, pooled, labels, classes = _evaluate(data, {"a": a, "b": b})
    assert result["split"] == "out-of-fold" and "out-of-fold predictions" in result["compared_on"]
    oof_a, oof_b = read_oof(a), read_oof(b)
    assert result["n_images"] == len(oof_a.ids) == 64  # train + val of the split folder
    where = {ident: i for i, ident in enumerate(oof_b.ids)}
    probs_b = oof_b.probs[[where[ident] for ident in oof_a.ids]]
    np.testing.assert_array_equal(labels, oof_a.labels)
    np.testing.assert_array_equal(pooled["b"], probs_b)
    rows = {r["metric"]: r for r in result["pairwise"]}
    assert rows["accuracy"]["a_value"] == pytest.approx((oof_a.probs.argmax(1) == labels).mean())
    assert rows["accuracy"]["b_value"] == pytest.approx((probs_b.argmax(1) == labels).mean())
    assert rows["auc"]["b_value"] == pytest.approx(roc_auc_score(labels, probs_b[:, 1]))
    assert result["arms"]["a"]["metrics"]["auc"]["values"] == [pytest.approx(roc_auc_score(labels, oof_a.probs[:, 1]))]


def test_out_of_fold_runs_must_cover_the_same_images(folds_arms, tmp_path):
    data, _, a, b = folds_arms
    short = tmp_path / "short"
    short.mkdir()
    (short / "oof.csv").write_text("".join((b / "oof.csv").read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(MedclfError, match="oof.csv does not cover the same images as the other runs"):
        _evaluate(data, {"a": a, "short": short})


def test_arms_with_and_without_folds_are_compared_on_test(folds_arms):
    data, run, a, _ = folds_arms
    result, _, _, _ = _evaluate(data, {"folds": a, "plain": run})
    assert result["split"] == "test" and result["n_images"] == 16 and "--folds" in result["compared_on"]
    own = json.loads((run / "metrics.json").read_text())["test"]
    assert result["arms"]["plain"]["metrics"]["auc"]["values"] == [pytest.approx(own["auc"])]


def test_arms_with_and_without_folds_need_a_test_split(folds_arms, tmp_path, capsys):
    _, run, a, _ = folds_arms
    no_test = tmp_path / "no_test"
    write_class_folders(no_test / "train", {"NORMAL": 4, "PNEUMONIA": 4})
    write_class_folders(no_test / "val", {"NORMAL": 4, "PNEUMONIA": 4})
    with pytest.raises(MedclfError) as error:
        _evaluate(no_test, {"folds": a, "plain": run})
    assert str(error.value) == ("arms ran with and without --folds and DATA has no test split: "
                                "no images are held out from all of them")


def test_comparison_page_says_it_compared_out_of_fold_predictions(folds_arms, tmp_path):
    from medclf.reporting.comparison import write_comparison_html
    from medclf.serialize import json_safe

    data, _, a, b = folds_arms
    result, pooled, labels, classes = _evaluate(data, {"a": a, "b": b})
    result = json_safe({**result, "data": str(data)})
    text = write_comparison_html(tmp_path, result, {"a": [a], "b": [b]}, labels, pooled, classes).read_text()
    assert "Predictions compared: the runs&#x27; out-of-fold predictions" in text
    assert "On the out-of-fold predictions (64 images" in text
    assert check_numbers(text, result) >= 6 * 2 + 6 * 5
