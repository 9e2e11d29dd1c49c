"""model_card.md: written by every run (single and cross-validation), its numbers equal to metrics.json's."""
from __future__ import annotations

import json
import re

import pytest

from conftest import FAST_FLAGS, make_split_folder
from medclf.cli import main
from medclf.model_card import HEADLINE, fmt
from medclf.rundir import RUN_FILES

SECTIONS = ("Model details", "Intended use", "Factors", "Metrics", "Training data", "Evaluation data",
            "Preprocessing", "Training settings", "Quantitative analyses", "Ethical considerations",
            "Caveats and recommendations", "How to reproduce")


def tables_after(card: str, heading: str, nth: int = 0) -> list[list[str]]:
    """The data rows of the nth Markdown table after `heading`."""
    tables, rows = [], []
    for line in card[card.index(heading):].splitlines()[1:] + [""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
        elif rows:
            tables.append(rows[2:])  # header and separator
            rows = []
    return tables[nth]


def metric_rows(card: str, heading: str) -> dict[str, tuple[str, str]]:
    return {row[0]: (row[1], row[2]) for row in tables_after(card, heading)}


def expected(value, ci) -> tuple[str, str]:
    return fmt(value), "n/a" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def check_split(card: str, heading: str, split_metrics: dict) -> None:
    rows = metric_rows(card, heading)
    assert len(rows) == len(HEADLINE)
    for key, label in HEADLINE.items():
        assert rows[label] == expected(split_metrics[key], split_metrics["ci95"][key]), (heading, key)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    data = make_split_folder(root / "xray")
    assert main(["train", str(data), *FAST_FLAGS, "--out", str(root / "run")]) == 0
    return root / "run"


def test_single_run_card_numbers_equal_metrics_json(single_run):
    card = (single_run / "model_card.md").read_text()
    metrics = json.loads((single_run / "metrics.json").read_text())
    for section in SECTIONS:
        assert f"\n## {section}\n" in card, section
    est = metrics["estimate"]
    rows = metric_rows(card, "### Expected performance")
    for key, label in HEADLINE.items():
        assert rows[label] == expected(est[key]["value"], est[key]["ci95"])
    check_split(card, "### Validation (16 images)", metrics["val"])
    check_split(card, "### Test (16 images)", metrics["test"])
    assert f"Calibration: ECE {fmt(metrics['test']['ece'])}." in card
    threshold = metrics["val"]["threshold"]
    assert f"threshold {fmt(threshold['value'])}, chosen on {threshold['chosen_on']}" in card
    per_class = {row[0]: row[1:] for row in tables_after(card, "### Validation (16 images)", nth=1)}
    for name, values in metrics["val"]["per_class"].items():
        assert per_class[f"`{name}`"] == [fmt(values["recall"]), fmt(values["specificity"]),
                                          fmt(values["precision"]), str(values["support"])]
    counts = {row[0]: row[1:] for row in tables_after(card, "Images per class and split")}
    assert counts["`NORMAL`"] == ["24", "8", "8", "40"] and counts["all"] == ["48", "16", "16", "80"]
    assert f"--config {single_run / 'config.yaml'}" in card
    assert "only 16 images (fewer than 200)" in card  # the small validation split is a known limitation


def test_card_ci_equals_bootstrap_of_predictions():
    """metrics.json's ci95 is the report's percentile bootstrap of the split's predictions."""
    import numpy as np

    from medclf.metrics import metric_functions
    from medclf.model_card import headline_intervals
    from medclf.stats import bootstrap_ci, expected_calibration_error

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(np.eye(2)[labels] * 0.3 + rng.random((60, 2)) * 0.7, 0, 1)  # overlapping: AUC < 1
    probs /= probs.sum(1, keepdims=True)
    got = headline_intervals(labels, probs, ["a", "b"], n_boot=200)
    from sklearn.metrics import roc_auc_score

    assert got["ci95"]["auc"] == list(bootstrap_ci(metric_functions(["a", "b"])["auc"], labels, probs, n_boot=200))
    assert got["ci95"]["auc"][0] <= roc_auc_score(labels, probs[:, 1]) <= got["ci95"]["auc"][1]
    assert got["ece"] == expected_calibration_error(labels, probs)


def test_card_names_the_dicom_mapping_the_checkpoint_records(single_run):
    from medclf.data import dicom

    card = (single_run / "model_card.md").read_text()
    preprocessing = card[card.index("## Preprocessing"):card.index("## Training settings")]
    assert f"DICOM by mapping `{dicom.MAPPING}`" in preprocessing


def test_report_regenerates_card_and_run_files_include_it(single_run):
    assert "model_card.md" in RUN_FILES
    (single_run / "model_card.md").unlink()
    assert main(["report", str(single_run)]) == 0
    assert "## Quantitative analyses" in (single_run / "model_card.md").read_text()


def test_crossval_run_card_quotes_out_of_fold(tmp_path):
    data = make_split_folder(tmp_path / "xray")
    flags = ["--epochs", "1", "--batch-size", "16", "--folds", "2"]
    assert main(["train", str(data), *flags, "--out", str(tmp_path / "run")]) == 0
    card = (tmp_path / "run" / "model_card.md").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "ensemble of 2 cross-validation fold models" in card
    check_split(card, f"### Out-of-fold (cross-validation) ({metrics['oof']['n']} images)", metrics["oof"])
    check_split(card, f"### Test ({metrics['test']['n']} images)", metrics["test"])
    assert re.search(r"method: out-of-fold, K=2", card)


def test_card_lists_doctor_findings(single_run, tmp_path):
    import shutil

    from medclf.model_card import write_model_card

    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    pair = {"a": {"item": "x.png", "split": "train"}, "b": {"item": "y.png", "split": "test"}}
    (run / "doctor.json").write_text(json.dumps({"checks": ["exact cross-split duplicates", "group overlap"],
                                                 "cross_split_duplicates": [pair], "group_overlap": []}))
    card = write_model_card(run).read_text()
    assert "checked: exact cross-split duplicates, group overlap" in card
    assert "- 1 image(s) duplicated across splits (leakage)" in card
    assert "- 0 patient(s)/group(s) with images in two splits (leakage)" in card
