"""Fine-tuning a medclf model at the size planned for the new data: the stem and normalisation come from the base."""
from __future__ import annotations

import csv

import torch
from conftest import FAST_FLAGS, write_class_folders

from medclf.cli import main
from medclf.planning import make_plan


def _fingerprint(side: int) -> dict:
    stats = {"median": side, "p10": side, "p90": side}
    return {"data": "x", "kind": "folder", "num_classes": 2, "images": {"train": 200, "val": 100},
            "imbalance_ratio": 1.0, "short_side": stats, "channels": 1}


def _base(stem: str, size: int) -> dict:
    return {"arch": "resnet18", "stem": stem, "input_size": size, "in_chans": 1}


def test_plan_fine_tunes_a_64px_base_at_224px_and_says_why():
    plan = make_plan(_fingerprint(224), base=_base("imagenet", 64), do_probe=False)
    assert plan["settings"]["size"] == 224 and plan["settings"]["stem"] == "imagenet"
    why = plan["reasons"]["size"]
    assert "the base was trained at 64 px" in why and "size-agnostic" in why and "224 px" in why


def test_plan_keeps_the_base_stem_and_its_size_when_no_candidate_suits_it():
    small = make_plan(_fingerprint(224), base=_base("small", 28), do_probe=False)  # no 224 px ladder for the small stem
    assert (small["settings"]["stem"], small["settings"]["size"]) == ("small", 28)
    assert "the base's 28 px" in small["reasons"]["size"]
    mnist = make_plan(_fingerprint(28), base=_base("small", 16), do_probe=False)
    assert (mnist["settings"]["stem"], mnist["settings"]["size"]) == ("small", 28)
    mine = make_plan(_fingerprint(224), base=_base("imagenet", 64), fixed={"size": 96}, do_probe=False)
    assert mine["settings"]["size"] == 96 and mine["reasons"]["size"] == "set by you"


def test_fine_tune_at_another_size_then_predict(npz_file, tmp_path):
    base = tmp_path / "base"
    assert main(["train", str(npz_file), *FAST_FLAGS, "--epochs", "1", "--out", str(base)]) == 0  # 16 px, small stem
    data = tmp_path / "d24"
    for split, n, seed in (("train", 24, 1), ("val", 8, 2), ("test", 8, 3)):
        write_class_folders(data / split, {"NORMAL": n, "PNEUMONIA": n}, size=24, seed=seed)
    out = tmp_path / "ft"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--weights", str(base / "model.pt"),
                 "--out", str(out)]) == 0
    b = torch.load(base / "model.pt", weights_only=True)
    f = torch.load(out / "model.pt", weights_only=True)
    assert (b["input_size"], f["input_size"]) == (16, 24)
    assert f["stem"] == b["stem"] == "small" and f["mean"] == b["mean"] and f["std"] == b["std"]
    assert main(["predict", str(out), str(data), "--split", "test", "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 16 and {r["prediction"] for r in rows} <= {"NORMAL", "PNEUMONIA"}
