"""The self-configuring plan: fingerprint, choices, plan.yaml, flags over the plan, a bounded probe."""
import json
import time

import numpy as np
import pytest
import yaml
from PIL import Image

import medclf
from medclf.cli import main
from medclf.config import TrainConfig
from medclf.data import sources
from medclf import planning, training

from conftest import FAST_FLAGS, make_image, make_split_folder, write_class_folders

plan_module = planning


def _fp(side: int, n_train: int = 5000, k: int = 2, kind: str = "npz", imbalance: float = 1.0) -> dict:
    return {"data": "x", "name": "x", "kind": kind, "classes": [str(i) for i in range(k)], "num_classes": k,
            "images": {"train": n_train, "val": n_train // 10}, "imbalance_ratio": imbalance,
            "short_side": {"median": side}, "channels": 1, "bit_depth": 8}


def _fake_probe(img_per_s: float):
    calls = []

    def probe(arch, k, channels, stem, size, store_size, batch_size, augment, device, max_seconds, max_steps, intensity=0.0):
        calls.append((stem, size, max_seconds, max_steps))
        # cost ∝ pixels reaching layer1: the small stem keeps the full size, the ImageNet stem divides it by 4
        side = size if stem == "small" else size / 4
        rate = img_per_s * (28 / side) ** 2  # img_per_s: the small stem at 28 px
        return {"train_img_per_s": rate, "infer_img_per_s": 5 * rate, "steps": 1, "batch_size": batch_size,
                "warmup_s": 0.0, "device": "fake"}

    return probe, calls


def test_fingerprint_of_a_folder_counts_imbalance_channels(tmp_path):
    root = tmp_path / "d"
    write_class_folders(root / "train", {"A": 30, "B": 10}, size=20)
    write_class_folders(root / "val", {"A": 6, "B": 2}, size=20, seed=1)
    fp = plan_module.fingerprint(sources.open_source(root))
    assert fp["counts"]["train"] == {"A": 30, "B": 10} and fp["counts"]["val"] == {"A": 6, "B": 2}
    assert fp["images"] == {"train": 40, "val": 8}
    assert fp["imbalance_ratio"] == 3.0
    assert fp["channels"] == 1 and fp["bit_depth"] == 8 and fp["modes"] == {"L": 40}
    assert fp["short_side"]["median"] == 20 and fp["aspect"]["median"] == 1.0


def test_fingerprint_colour_16bit_and_aspect(tmp_path):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for c in ("A", "B"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    fp = plan_module.fingerprint(sources.open_source(root))
    assert fp["channels"] == 3 and fp["aspect"]["median"] == pytest.approx(1.5) and fp["short_side"]["median"] == 20
    deep = tmp_path / "deep"
    for c in ("A", "B"):
        (deep / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 4000, (16, 16), dtype=np.uint16)).save(deep / c / f"{i}.png")
    assert plan_module.fingerprint(sources.open_source(deep))["bit_depth"] == 16


def test_fingerprint_of_an_npz(npz_file):
    fp = plan_module.fingerprint(sources.open_source(npz_file))
    assert fp["kind"] == "npz" and fp["num_classes"] == 3 and fp["channels"] == 1 and fp["bit_depth"] == 8
    assert fp["images"] == {"train": 60, "val": 18, "test": 18} and fp["short_side"]["median"] == 16
    assert fp["imbalance_ratio"] == 1.0


def test_plan_for_tiny_small_and_large_images(monkeypatch):
    probe, calls = _fake_probe(img_per_s=2000)
    monkeypatch.setattr(plan_module, "probe", probe)
    tiny = plan_module.make_plan(_fp(12, n_train=48))
    assert tiny["settings"]["stem"] == "small" and tiny["settings"]["size"] == 12
    mnist = plan_module.make_plan(_fp(28))
    first_stem, first_size, _ = plan_module._candidates(28, None)[0]
    assert (mnist["settings"]["stem"], mnist["settings"]["size"]) == (first_stem, first_size)
    big = plan_module.make_plan(_fp(512, n_train=200, kind="folder"))
    assert big["settings"]["stem"] == "imagenet" and 64 <= big["settings"]["size"] <= 224
    assert big["settings"]["augment"] == "strong" and big["settings"]["batch_size"] == 16
    assert mnist["settings"]["monitor"] == "auc" and big["settings"]["monitor"] == "loss"  # 500 vs 20 val images
    # every setting comes with a one-line reason
    for p in (tiny, mnist, big):
        assert set(p["settings"]) == set(plan_module.PLANNED) == set(p["reasons"])
        assert all(r and "\n" not in r for r in p["reasons"].values())


def test_epochs_fit_the_budget_and_a_slow_machine_picks_a_cheaper_size(monkeypatch):
    probe, _ = _fake_probe(img_per_s=2000)
    monkeypatch.setattr(plan_module, "probe", probe)
    fast = plan_module.make_plan(_fp(28), time_budget=10)
    p = fast["probe"][-1]
    assert fast["settings"]["epochs"] == min(plan_module.MAX_EPOCHS, int(0.85 * 600 // p["epoch_s"]))
    longer = plan_module.make_plan(_fp(28), time_budget=20)
    assert longer["settings"]["epochs"] >= fast["settings"]["epochs"]
    slow_probe, calls = _fake_probe(img_per_s=20)
    monkeypatch.setattr(plan_module, "probe", slow_probe)
    slow = plan_module.make_plan(_fp(64, n_train=47000, k=6, kind="folder"), time_budget=5)
    assert len(calls) > 1 and slow["settings"]["size"] < 64  # fell down the ladder to a cheaper size
    assert slow["settings"]["monitor"] == "loss" and slow["settings"]["batch_size"] == 128


def test_large_data_picks_a_size_that_fits_twice_its_minimum_epochs(monkeypatch):
    """A large set (MedNIST-like) whose validation saturates trains its minimum 3 epochs: at a size that fits only
    those, that run would take most of the budget. A size that fits twice the minimum is chosen instead; a small
    set on the same machine keeps the larger size that fits its minimum."""
    monkeypatch.setattr(plan_module, "probe", _fake_probe(img_per_s=120)[0])
    large = plan_module.make_plan(_fp(64, n_train=47000, k=6, kind="folder"), time_budget=10)
    at_64 = next(row for row in large["probe"] if row["size"] == 64)
    assert large["min_epochs"] <= at_64["epochs_in_budget"] < 2 * large["min_epochs"]  # the old rule took 64 px
    assert large["settings"]["size"] == 48 and large["settings"]["epochs"] >= 2 * large["min_epochs"]
    assert "must fit 2× the 3 minimum epochs" in large["reasons"]["size"]
    monkeypatch.setattr(plan_module, "probe", _fake_probe(img_per_s=40)[0])
    small = plan_module.make_plan(_fp(64, n_train=5000, k=6, kind="folder"), time_budget=10)
    assert small["settings"]["size"] == 64 and small["settings"]["epochs"] < 2 * small["min_epochs"]
    assert "minimum epochs" not in small["reasons"]["size"]


def test_imbalance_and_fixed_settings(monkeypatch):
    probe, _ = _fake_probe(img_per_s=2000)
    monkeypatch.setattr(plan_module, "probe", probe)
    p = plan_module.make_plan(_fp(28, imbalance=2.9), fixed={"augment": "none", "epochs": 3})
    assert p["settings"]["balance"] == "weight" and "2.90x" in p["reasons"]["balance"]
    assert p["settings"]["augment"] == "none" and p["reasons"]["augment"] == "set by you"
    assert p["settings"]["epochs"] == 3 and p["reasons"]["epochs"].startswith("set by you")


def test_plan_command_saves_a_yaml_that_round_trips(tmp_path, capsys):
    data = make_split_folder(tmp_path / "d")
    out = tmp_path / "plan.yaml"
    assert main(["plan", str(data), "--time-budget", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "imbalance" in printed and "stem" in printed and "epochs" in printed
    saved = yaml.safe_load(out.read_text())
    assert set(saved["settings"]) == set(plan_module.PLANNED) and saved["settings"]["time_budget"] == 3
    assert saved["settings"]["size"] == 12 and saved["settings"]["stem"] == "small"
    # the plan's settings form a valid training config
    cfg = TrainConfig.from_dict({"data": str(data), **saved["settings"]}).validate()
    assert cfg.epochs == saved["settings"]["epochs"]
    result = medclf.plan(str(data), time_budget=3, verbose=False)
    assert result["settings"] == saved["settings"] or result["settings"]["size"] == saved["settings"]["size"]


def test_train_uses_the_plan_and_flags_win(tmp_path):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--augment", "none", "--label-smoothing", "0.05",
                 "--out", str(run)]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    saved = yaml.safe_load((run / "plan.yaml").read_text())
    fp = json.loads((run / "fingerprint.json").read_text())
    assert fp["images"]["train"] == 48 and fp["counts"]["train"] == {"NORMAL": 24, "PNEUMONIA": 24}
    assert config["epochs"] == 1 and config["batch_size"] == 16 and config["augment"] == "none"
    assert config["label_smoothing"] == 0.05 and saved["reasons"]["augment"] == "set by you"
    # what the user left open comes from the plan
    for name in ("lr", "monitor", "ema", "warmup_epochs", "time_budget"):
        assert config[name] == saved["settings"][name], name
    assert config["time_budget"] == 10.0


def test_no_plan_keeps_the_fixed_defaults(tmp_path):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--no-plan", "--out", str(run)]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    d = TrainConfig()
    assert config["augment"] == d.augment and config["lr"] is None and config["label_smoothing"] == d.label_smoothing
    assert not (run / "plan.yaml").exists()


def test_config_rerun_does_not_replan(tmp_path, monkeypatch):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    monkeypatch.setattr(plan_module, "make_plan", lambda *a, **k: pytest.fail("re-planned a fully set config"))
    train_module = training

    monkeypatch.setattr(train_module, "make_plan", lambda *a, **k: pytest.fail("re-planned a fully set config"))
    assert main(["train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "again")]) == 0


def test_probe_is_bounded():
    """One warm-up step, then timed steps until max_steps or max_seconds, whichever comes first."""
    p = plan_module.probe("resnet18", 2, 1, "small", 12, 12, 8, max_seconds=0.0, max_steps=5)
    assert p["steps"] == 1 and p["train_img_per_s"] > 0 and p["infer_img_per_s"] > 0
    p = plan_module.probe("resnet18", 2, 1, "small", 12, 12, 8, max_seconds=60, max_steps=2)
    assert p["steps"] == 2


def test_fixed_epochs_skip_the_probe(tmp_path, monkeypatch):
    """With --epochs given there is nothing to fit: the plan runs no timing probe."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 10)):
        labels = np.arange(n) % 2
        arrays[f"{split}_images"] = np.stack([make_image(int(l), 28, rng) for l in labels])
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    npz = tmp_path / "mnist28.npz"
    np.savez(npz, **arrays)
    monkeypatch.setattr(plan_module, "probe", lambda *a, **k: pytest.fail("probed although --epochs was given"))
    t0 = time.perf_counter()
    result = medclf.plan(str(npz), verbose=False, epochs=1)
    assert time.perf_counter() - t0 < 2 and result["probe"] == []
    assert result["settings"]["epochs"] == 1
