"""Export (ONNX / TorchScript), manifest.json and the ONNX engine of predict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_split_folder
from medclf.cli import main
from medclf.manifest import build_manifest, weights_sha256
from medclf.models import read_checkpoint

TINY_FLAGS = ["--epochs", "1", "--batch-size", "16", "--patience", "0", "--folds", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = make_split_folder(root / "data")
    assert main(["train", str(data), *TINY_FLAGS, "--out", str(root / "run")]) == 0
    return root / "run"


def test_manifest_states_the_checkpoints_input_and_threshold(tiny_run):
    ckpt = read_checkpoint(tiny_run)
    manifest = build_manifest(ckpt, tiny_run)
    assert manifest["classes"] == ckpt["classes"]
    assert manifest["task"] == "single-label"
    assert manifest["input"]["channels"] == ckpt["in_chans"]
    assert manifest["input"]["height"] == ckpt.get("store_size", ckpt["input_size"])
    assert manifest["preprocessing"]["mean"] == ckpt["mean"] and manifest["preprocessing"]["std"] == ckpt["std"]
    assert manifest["preprocessing"]["crop"] == ckpt["crop"]
    assert manifest["decision"]["threshold"] == ckpt["threshold"]
    assert manifest["source"]["run"] == str(tiny_run.resolve())
    json.dumps(manifest)  # JSON-serialisable as it is


def test_manifest_reads_task_and_thresholds_when_the_checkpoint_has_them(tiny_run):
    ckpt = {**read_checkpoint(tiny_run), "task": "multi-label", "thresholds": [0.3, 0.6]}
    manifest = build_manifest(ckpt, None)
    assert manifest["task"] == "multi-label"
    assert manifest["decision"]["thresholds"] == [0.3, 0.6]
    assert manifest["source"]["run"] is None


def test_weights_hash_changes_with_any_weight():
    state = {"a": torch.zeros(3), "n": torch.tensor(0)}
    same = {"n": torch.tensor(0), "a": torch.zeros(3)}
    changed = {"a": torch.tensor([0.0, 0.0, 1e-7]), "n": torch.tensor(0)}
    assert weights_sha256(state) == weights_sha256(same)
    assert weights_sha256(state) != weights_sha256(changed)
