"""Real public data from ../shared; skipped where that folder is absent."""
import json

import pytest

from medclf.cli import main

from conftest import SHARED

CHEST = SHARED / "chest_xray_400"


@pytest.mark.slow
@pytest.mark.skipif(not CHEST.is_dir(), reason="../shared/datasets/chest_xray_400 not present")
def test_chest_xray_400_train_evaluate_predict(tmp_path):
    run = tmp_path / "run"
    # 64 px keeps this test to about a minute on 2 cores; the full 224 px run is the README's example
    assert main(["train", str(CHEST), "--epochs", "1", "--size", "64", "--batch-size", "32", "--folds", "0",
                 "--out", str(run)]) == 0  # one model validated on val (the plan would cross-validate 300 images)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["n"] == 100 and len(metrics["val"]["per_class"]) == 2
    assert (run / "roc.png").is_file()
    assert main(["evaluate", str(run), str(CHEST), "--split", "val", "--out", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())["val"]
    assert again["accuracy"] == pytest.approx(metrics["val"]["accuracy"])
    assert main(["predict", str(run), str(CHEST / "val" / "NORMAL"), "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 51
