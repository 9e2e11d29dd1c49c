"""The offline demo: a PneumoniaMNIST sample inside the package that `medclf train demo` trains on with no network,
no ../shared and an empty data cache."""
import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medclf import planning
from medclf.cli import main
from medclf.data import named, sources

from conftest import FAST_FLAGS, SHARED

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty data cache, and any attempt to open a network connection fails the test."""
    home = tmp_path / "empty-home"
    home.mkdir()
    monkeypatch.setenv("MEDCLF_DATA", str(home))

    def no_network(*args, **kwargs):
        raise AssertionError(f"the demo tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return home


def test_train_demo_offline_with_an_empty_cache(offline, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "demo", *FAST_FLAGS, "--epochs", "1", "--batch-size", "64", "--out", str(run)]) == 0
    assert (run / "model.pt").is_file()
    rows = (run / "splits.csv").read_text().splitlines()
    assert len(rows) == 1 + 500 and {r.split(",")[0] for r in rows[1:]} == {"train", "val", "test"}
    assert {p.name for p in offline.iterdir()} <= {"stores"}  # the decoded-image cache only: nothing downloaded


def test_demo_is_listed_and_ships_with_its_licence(offline, capsys):
    assert main(["datasets"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("demo "))
    assert "cached" in line and "offline demo" in line
    assert named.DEMO["file"].stat().st_size < 1_000_000
    notes = (named.DEMO["file"].parent / "README.txt").read_text()
    assert "CC BY 4.0" in notes and "MedMNIST v2" in notes and "Kermany" in notes and "Yang" in notes
    source = sources.open_source("demo")
    assert source.classes == ["normal", "pneumonia"]
    assert {s: len(split) for s, split in source.splits.items()} == {"train": 300, "val": 100, "test": 100}


def test_demo_plans_its_own_short_budget_unless_given(offline):
    planned = planning.plan("demo", do_probe=False, verbose=False)
    assert planned["settings"]["time_budget"] == named.DEMO["time_budget"] < planning.DEFAULT_BUDGET
    assert "sample's own short budget" in planned["reasons"]["time_budget"]
    assert planning.plan("demo", time_budget=3, do_probe=False, verbose=False)["settings"]["time_budget"] == 3
    npz = planning.plan(str(named.DEMO["file"]), do_probe=False, verbose=False)  # the same file by path: no demo
    assert npz["settings"]["time_budget"] == planning.DEFAULT_BUDGET


def test_demo_at_another_size_is_one_line(capsys):
    assert main(["plan", "demo@64"]) == 2
    assert capsys.readouterr().err.strip() == "medclf: error: the demo sample comes at 28 px only, not 64"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "pneumoniamnist_28_trainval.npz").is_file(), reason="needs ../shared")
def test_make_demo_regenerates_the_shipped_sample(tmp_path):
    out = tmp_path / "demo.npz"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo.py"),
                    str(SHARED / "pneumoniamnist_28_trainval.npz"), str(out)], check=True)
    fresh, shipped = np.load(out), np.load(named.DEMO["file"])
    assert sorted(fresh.files) == sorted(shipped.files)
    for key in fresh.files:
        assert np.array_equal(fresh[key], shipped[key]), key
    digests = [hashlib.sha1(img.tobytes()).hexdigest() for s in ("train", "val", "test") for img in fresh[f"{s}_images"]]
    assert len(set(digests)) == len(digests)  # no image in two splits
