"""Multi-label tasks (several findings per image): data, metrics against scikit-learn, and the CLI end to end."""
import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from medclf import metrics, tasks
from medclf.cli import main
from medclf.comparison import pair_tests
from medclf.data import named, sources, splits
from medclf.errors import MedclfError
from medclf.models import read_checkpoint
from medclf.planning import fingerprint, make_plan

from conftest import FAST_FLAGS

LABELS = 3


def multilabel_arrays(n: int, rng: np.random.Generator, size: int = 16, width: int = LABELS):
    """Images where label j brightens the j-th band of rows; any subset of labels (none included) may be on."""
    y = (rng.random((n, width)) < 0.4).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    band = size // width
    for j in range(width):
        images[y[:, j] == 1, j * band:(j + 1) * band, :] += 150
    return images, y


def write_multilabel_npz(path, sizes=(("train", 64), ("val", 32), ("test", 32)), width: int = LABELS, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes:
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = multilabel_arrays(n, rng, width=width)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("multilabel")
    data = write_multilabel_npz(base / "findings.npz")
    run = base / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--out", str(run)]) == 0
    return data, run


def random_scores(rng, n=80, width=4):
    y = (rng.random((n, width)) < 0.3).astype(np.int64)
    y[:2] = [[1] * width, [0] * width]  # every label has both outcomes
    probs = np.clip(y * 0.3 + rng.random((n, width)) * 0.7, 0, 1).round(1)  # rounding makes ties
    return y, probs


# ---- metrics: scikit-learn is the oracle ----

def test_macro_and_micro_auc_equal_scikit_learn():
    y, probs = random_scores(np.random.default_rng(1))
    assert metrics.macro_auc(y, probs) == pytest.approx(roc_auc_score(y, probs, average="macro"))
    assert metrics.micro_auc(y, probs) == pytest.approx(roc_auc_score(y, probs, average="micro"))


def test_average_precision_equals_scikit_learn_per_label_and_macro():
    y, probs = random_scores(np.random.default_rng(2))
    for j in range(y.shape[1]):
        assert metrics.average_precision(y[:, j] == 1, probs[:, j]) == pytest.approx(
            average_precision_score(y[:, j], probs[:, j]))
    assert metrics.macro_average_precision(y, probs) == pytest.approx(average_precision_score(y, probs, average="macro"))


def test_per_label_rates_at_thresholds_chosen_by_youden():
    y, probs = random_scores(np.random.default_rng(3))
    thresholds = metrics.label_thresholds(y, probs)
    m = metrics.multilabel_metrics(y, probs, ["a", "b", "c", "d"], thresholds)
    for j, name in enumerate("abcd"):
        fpr, tpr, cut = roc_curve(y[:, j], probs[:, j])
        assert thresholds[j] == pytest.approx(min(cut[np.argmax(tpr - fpr)], 1.0))
        decided = probs[:, j] >= thresholds[j]
        row = m["per_label"][name]
        assert row["sensitivity"] == pytest.approx(decided[y[:, j] == 1].mean())
        assert row["specificity"] == pytest.approx((~decided[y[:, j] == 0]).mean())
        assert row["auc"] == pytest.approx(roc_auc_score(y[:, j], probs[:, j]))
        assert row["support"] == int(y[:, j].sum())
    assert m["accuracy"] == pytest.approx((metrics.decided_labels(probs, thresholds) == y).mean())
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, average="macro"))


def test_a_label_without_positives_is_left_out_of_the_macro_auc():
    y, probs = random_scores(np.random.default_rng(4))
    y[:, 0] = 0
    m = metrics.multilabel_metrics(y, probs, ["a", "b", "c", "d"])
    assert m["per_label"]["a"]["auc"] != m["per_label"]["a"]["auc"]  # NaN
    assert m["auc"] == pytest.approx(roc_auc_score(y[:, 1:], probs[:, 1:], average="macro"))


def test_estimate_gives_macro_auc_with_a_bootstrap_interval():
    y, probs = random_scores(np.random.default_rng(5), n=120)
    est = metrics.estimate(y, probs, list("abcd"), metrics.METHOD_VAL, n_boot=200)
    assert set(metrics.MULTILABEL_HEADLINE) <= set(est)
    assert est["auc"]["value"] == pytest.approx(roc_auc_score(y, probs, average="macro"))
    low, high = est["auc"]["ci95"]
    assert low < est["auc"]["value"] < high


def test_paired_comparison_per_label_and_on_macro_auc():
    rng = np.random.default_rng(6)
    y, probs = random_scores(rng)
    worse = np.clip(probs + rng.normal(0, 0.3, probs.shape), 0, 1)
    rows = {r["metric"]: r for r in pair_tests(y, probs, worse, list("abcd"), "a", "b", n_boot=200)}
    assert {"auc", "auc_micro", "average_precision_macro", "auc_a", "auc_d"} <= set(rows)
    assert "accuracy" not in rows  # thresholds differ per run: only threshold-free metrics are compared
    assert rows["auc"]["difference"] == pytest.approx(
        roc_auc_score(y, probs, average="macro") - roc_auc_score(y, worse, average="macro"))
    assert rows["auc"]["method"].startswith("paired bootstrap")


# ---- training pieces ----

def test_bce_loss_with_pos_weight_of_negatives_over_positives():
    labels = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 1]])
    logits = torch.randn(4, 2)
    loss = tasks.loss_function(tasks.MULTILABEL, labels, "weight", 0.0, lambda y: None)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 1.0]))(logits, labels.float())
    assert torch.allclose(loss(logits, labels), expected)
    smoothed = tasks.loss_function(tasks.MULTILABEL, labels, "none", 0.2, lambda y: None)
    targets = labels.float() * 0.8 + 0.1
    assert torch.allclose(smoothed(logits, labels), torch.nn.BCEWithLogitsLoss()(logits, targets))


def test_stratified_split_of_label_sets_keeps_every_image_once():
    y = np.random.default_rng(7).integers(0, 2, (50, 3))
    parts = splits.stratified_split(y, 0.2, 0.2, seed=0)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(50))


# ---- data ----

def test_npz_with_label_columns_opens_as_multilabel(tmp_path):
    source = sources.open_source(write_multilabel_npz(tmp_path / "f.npz"))
    assert source.task == sources.MULTILABEL and source.classes == ["0", "1", "2"]
    assert source.splits["train"].labels.shape == (64, LABELS) and source.splits["train"].labels.dtype == np.int64


def test_named_multilabel_dataset_gets_its_finding_names(tmp_path, monkeypatch):
    path = write_multilabel_npz(tmp_path / "chesty.npz", width=2)
    info = {"chestymnist": {"url": "http://127.0.0.1:9/x", "MD5": "0" * 32, "task": "multi-label, binary-class",
                            "label": {"0": "atelectasis", "1": "effusion"}}}
    monkeypatch.setattr(named, "_medmnist_info", lambda: info)
    monkeypatch.setattr(named, "_download", lambda url, home, filename, md5: path)
    source = sources.open_source("chestymnist")
    assert source.task == sources.MULTILABEL and source.classes == ["atelectasis", "effusion"]


def test_fingerprint_and_plan_of_multilabel_data(tmp_path):
    fp = fingerprint(sources.open_source(write_multilabel_npz(tmp_path / "f.npz")))
    assert fp["task"] == "multi-label" and fp["images"]["train"] == 64
    labels = np.load(tmp_path / "f.npz")["train_labels"]
    assert fp["counts"]["train"]["1"] == int(labels[:, 1].sum())
    plan = make_plan(fp, do_probe=False)
    assert plan["settings"]["folds"] == 0 and "multi-label" in plan["reasons"]["folds"]
    assert plan["settings"]["label_smoothing"] == 0.0
    assert "pos_weight" in plan["reasons"]["balance"] or "BCE" in plan["reasons"]["balance"]


@pytest.mark.parametrize("labels, message", [
    (np.full((8, 3), 2), "must hold 0/1 per label"),
    (None, "disagree on the number of labels"),
])
def test_bad_multilabel_npz_is_one_line(tmp_path, capsys, labels, message):
    rng = np.random.default_rng(0)
    images, y = multilabel_arrays(8, rng)
    val_labels = y[:, :2] if labels is None else y
    np.savez(tmp_path / "bad.npz", train_images=images, train_labels=y if labels is None else labels,
             val_images=images, val_labels=val_labels)
    assert main(["train", str(tmp_path / "bad.npz"), *FAST_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("flags, message", [(["--balance", "sample"], "--balance sample"),
                                            (["--folds", "2"], "--folds 2")])
def test_unsupported_settings_are_refused_in_one_line(tmp_path, capsys, flags, message):
    data = write_multilabel_npz(tmp_path / "f.npz")
    argv = ["train", str(data), *FAST_FLAGS, *flags, "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "multi-label" in err[0]
    assert not (tmp_path / "run").exists()


# ---- end to end through the CLI ----

def test_train_records_the_task_thresholds_and_per_label_metrics(trained):
    data, run = trained
    ckpt = read_checkpoint(run)
    assert ckpt["task"] == "multi-label" and len(ckpt["thresholds"]) == LABELS
    saved = json.loads((run / "metrics.json").read_text())
    test = saved["test"]
    assert test["task"] == "multi-label" and set(test["per_label"]) == {"0", "1", "2"}
    assert [test["per_label"][c]["threshold"] for c in "012"] == pytest.approx(ckpt["thresholds"])
    assert saved["estimate"]["auc"]["value"] == pytest.approx(saved["val"]["auc"])
    assert (run / "roc.png").is_file() and not (run / "confusion_matrix.png").exists()
    rows = list(csv.DictReader(open(run / "splits.csv")))
    y = np.load(data)["train_labels"]
    first = next(r for r in rows if r["split"] == "train" and r["id"] == "0")
    assert first["label"] == "|".join(str(j) for j in range(LABELS) if y[0, j])


def test_evaluate_matches_metrics_json(trained, tmp_path):
    data, run = trained
    assert main(["evaluate", str(run), str(data), "--out", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())["test"]
    saved = json.loads((run / "metrics.json").read_text())["test"]
    assert again["auc"] == pytest.approx(saved["auc"]) and again["auc_micro"] == pytest.approx(saved["auc_micro"])


def test_predict_writes_a_probability_per_label_and_the_decided_set(trained, tmp_path):
    data, run = trained
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(data), "--split", "test", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    thresholds = read_checkpoint(run)["thresholds"]
    y = np.load(data)["test_labels"]
    assert len(rows) == len(y)
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in "012"]
        assert row["prediction"] == "|".join(c for c, p, t in zip("012", probs, thresholds) if p >= t)
        i = int(row["index"])
        assert row["label"] == "|".join(str(j) for j in range(LABELS) if y[i, j])


def test_report_has_a_per_label_table_and_roc_per_label(trained, tmp_path):
    _, run = trained
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    saved = json.loads((run / "metrics.json").read_text())
    assert "Per label" in html and "ROC and precision-recall per label" in html
    key = json.dumps(["test", "per_label", "1", "auc"])
    assert f"data-key='{key}' data-value='{json.dumps(saved['test']['per_label']['1']['auc'])}'" in html.replace("&quot;", '"')


def test_explain_one_label_with_gradcam(trained, tmp_path):
    data, run = trained
    from PIL import Image

    images = np.load(data)["test_images"][:2]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    out = tmp_path / "cams"
    assert main(["explain", str(run), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--class", "2",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "explain.csv")))
    assert [r["explained_class"] for r in rows] == ["2", "2"]
    assert all((out / f"{i}.gradcam.png").is_file() for i in range(2))


def test_a_multilabel_model_refuses_single_label_data(trained, tmp_path, capsys):
    _, run = trained
    rng = np.random.default_rng(0)
    images, y = multilabel_arrays(8, rng)
    np.savez(tmp_path / "single.npz", test_images=images, test_labels=(np.arange(8) % 3).reshape(-1, 1))
    assert main(["evaluate", str(run), str(tmp_path / "single.npz")]) == 2
    assert "multi-label" in capsys.readouterr().err


# ---- CSV label files (medclf/data/table.py): findings joined by "|", or several 0/1 columns ----
FINDINGS = ["Effusion", "Mass", "Nodule"]


def write_multilabel_csv(root, n_train=48, n_val=16, n_test=16, seed=0):
    """PNG images and labels.csv with a `Finding Labels` column (A|B, "No Finding"), a split and 0/1 columns."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    lines = ["Image Index,Finding Labels,split," + ",".join(FINDINGS)]
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        images, y = multilabel_arrays(n, rng)
        for i, (image, row) in enumerate(zip(images, y)):
            name = f"{split}_{i}.png"
            Image.fromarray(image).save(root / "img" / name)
            text = "|".join(f for f, on in zip(FINDINGS, row) if on) or "No Finding"
            lines.append(f"img/{name},{text},{split}," + ",".join(map(str, row)))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_csv_finding_strings_become_label_columns(tmp_path):
    table = write_multilabel_csv(tmp_path)
    source = sources.open_source(table)
    assert source.task == sources.MULTILABEL and source.classes == FINDINGS
    rows = [line.split(",") for line in table.read_text().splitlines()[1:] if ",train," in line]
    expected = np.array([[int(v) for v in r[3:]] for r in rows])
    assert np.array_equal(source.splits["train"].labels, expected)


def test_csv_zero_one_columns_give_the_same_labels(tmp_path):
    table = write_multilabel_csv(tmp_path)
    by_columns = sources.open_source(table, label_col=",".join(FINDINGS))
    by_strings = sources.open_source(table)
    assert by_columns.task == sources.MULTILABEL and by_columns.classes == FINDINGS
    for split in ("train", "val", "test"):
        assert np.array_equal(by_columns.splits[split].labels, by_strings.splits[split].labels)


def test_csv_custom_no_finding_value(tmp_path):
    table = write_multilabel_csv(tmp_path)
    table.write_text(table.read_text().replace("No Finding", "normal"))
    assert sources.open_source(table, no_finding="normal").classes == FINDINGS
    assert "normal" in sources.open_source(table).classes  # without the flag it is one more finding


@pytest.mark.parametrize("edit, flags, message", [
    (lambda t: t.replace("Effusion|", "Effusion||", 1), [], "empty finding"),
    (lambda t: t.replace(",test,", ",test,", 1).replace("Mass,test", "Fibrosis,test", 1), [], "never appears in training"),
    (lambda t: t.replace(",1\n", ",2\n", 1), ["--label-col", ",".join(FINDINGS)], "label columns hold 0 or 1"),
    (lambda t: t, ["--label-col", "Effusion,Edema"], "no such column"),
])
def test_bad_multilabel_csv_is_one_line(tmp_path, capsys, edit, flags, message):
    table = write_multilabel_csv(tmp_path, n_train=12, n_val=4, n_test=4)
    table.write_text(edit(table.read_text()))
    assert main(["train", str(table), *FAST_FLAGS, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_csv_multilabel_trains_and_reports_per_label_and_macro_auc(tmp_path):
    table = write_multilabel_csv(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(table), *FAST_FLAGS, "--size", "16", "--out", str(run)]) == 0
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved["test"]["per_label"]) == set(FINDINGS)
    assert saved["test"]["auc"] is not None and "auc_micro" in saved["test"]
    html = (run / "report.html").read_text()
    assert all(f in html for f in FINDINGS) and "macro ROC AUC" in html
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(table), "--split", "test", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 16 and {f"prob_{f}" for f in FINDINGS} <= set(rows[0])


def test_compare_shares_a_multilabel_csv_split_that_reopens_with_the_same_labels(tmp_path):
    from medclf.comparison import fixed_splits

    table = write_multilabel_csv(tmp_path / "d")
    lines = table.read_text().splitlines()
    no_split = [",".join(c for k, c in enumerate(line.split(",")) if k != 2) for line in lines]
    table.write_text("\n".join(no_split) + "\n")  # no split column: compare makes the split once
    shared, _ = fixed_splits(str(table), tmp_path / "cmp", seed=0, val_fraction=0.2, test_fraction=0.2)
    original = sources.open_source(table, val_fraction=0.2, test_fraction=0.2)
    reopened = sources.open_source(shared)
    assert reopened.task == sources.MULTILABEL and reopened.classes == FINDINGS
    for split in ("train", "val", "test"):
        assert np.array_equal(reopened.splits[split].labels, original.splits[split].labels)


def test_model_card_of_a_multi_label_run_quotes_metrics_json(trained):
    """The card's headline rows are the multi-label ones with metrics.json's CIs, and each label's AUC and
    threshold appear as metrics.json gives them."""
    from medclf.model_card import MULTILABEL_HEADLINE, fmt

    _, run = trained
    card = (run / "model_card.md").read_text()
    saved = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        m = saved[split]
        for key, words in MULTILABEL_HEADLINE.items():
            low, high = m["ci95"][key]
            assert f"| {words} | {fmt(m[key])} | [{fmt(low)}, {fmt(high)}] |" in card, (split, key)
        for name, row in m["per_label"].items():
            assert f"| `{name}` | {fmt(row['auc'])} | {fmt(row['threshold'])} |" in card, (split, name)
    assert m["ece"] is None
