"""Export (ONNX / TorchScript), manifest.json and the ONNX engine of predict."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import medclf
from conftest import SHARED, make_split_folder
from medclf import inference
from medclf.cli import main
from medclf.data.store import Store
from medclf.exporting import INT8_TOLERANCE, cached_onnx
from medclf.inference import GraphModel, LoadedModel, input_store, load_for_inference
from medclf.manifest import build_manifest, weights_sha256
from medclf.models import ensemble_checkpoint, read_checkpoint, resolve_model_path
from medclf.quantize import calibration_batch

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


def test_manifest_states_the_dicom_mapping_the_checkpoint_recorded(tiny_run):
    from medclf.data import dicom

    ckpt = read_checkpoint(tiny_run)
    assert ckpt["dicom_mapping"] == dicom.MAPPING  # training records it
    rule = build_manifest(ckpt, tiny_run)["decode"]["dicom"]
    assert rule["mapping"] == dicom.MAPPING and any("MONOCHROME1" in step for step in rule["steps"])
    older = {k: v for k, v in ckpt.items() if k != "dicom_mapping"}
    assert "dicom" not in build_manifest(older, None)["decode"]


def test_weights_hash_changes_with_any_weight():
    state = {"a": torch.zeros(3), "n": torch.tensor(0)}
    same = {"n": torch.tensor(0), "a": torch.zeros(3)}
    changed = {"a": torch.tensor([0.0, 0.0, 1e-7]), "n": torch.tensor(0)}
    assert weights_sha256(state) == weights_sha256(same)
    assert weights_sha256(state) != weights_sha256(changed)


# --- export and parity -------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"
CHEST = SHARED / "chest_xray_400"
PNEUMONIAMNIST = SHARED / "pneumoniamnist_28_trainval.npz"
PARITY = 1e-4


def probabilities(csv_path: Path) -> dict[str, np.ndarray]:
    """id (path or npz row) → the prob_* columns of a predictions CSV."""
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    key = "path" if "path" in rows[0] else "index"
    columns = [c for c in rows[0] if c.startswith("prob_")]
    return {row[key]: np.array([float(row[c]) for c in columns]) for row in rows}


def assert_same_probabilities(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert expected.keys() == actual.keys() and expected
    worst = max(np.abs(expected[k] - actual[k]).max() for k in expected)
    assert worst <= PARITY, worst


def run_example(export_dir: Path, inputs: list[str], out: Path) -> dict[str, np.ndarray]:
    """examples/onnx_predict.py in a fresh interpreter that cannot import medclf."""
    code = ("import sys, runpy; sys.modules['medclf'] = None; sys.modules['torch'] = None; "
            f"sys.argv = {[str(EXAMPLE), str(export_dir), *inputs, '--out', str(out)]!r}; "
            f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=export_dir)
    assert done.returncode == 0, done.stderr
    return probabilities(out)


@pytest.fixture(scope="module")
def onnx_export(tiny_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("onnx")
    assert main(["export", str(tiny_run), "--out", str(folder)]) == 0
    return folder


def test_export_writes_model_and_manifest(onnx_export, tiny_run):
    manifest = json.loads((onnx_export / "manifest.json").read_text())
    assert manifest["files"] == {"model": "model.onnx", "format": "onnx", "model_card": "model_card.md"}
    assert (onnx_export / "model_card.md").read_text() == (tiny_run / "model_card.md").read_text()  # travels along
    assert manifest["opset"] >= 18
    assert manifest["weights_sha256"] == weights_sha256(read_checkpoint(tiny_run)["state_dict"])
    import onnx

    graph = onnx.load(str(onnx_export / "model.onnx")).graph
    (image,), (probs,) = graph.input, graph.output
    assert (image.name, probs.name) == ("image", "probabilities")
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert image.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis


def test_plain_onnxruntime_script_reproduces_predict(onnx_export, tiny_run, tmp_path):
    data = tiny_run.parent / "data" / "val"
    assert main(["predict", str(tiny_run), str(data), "--out", str(tmp_path / "torch.csv")]) == 0
    expected = probabilities(tmp_path / "torch.csv")
    assert_same_probabilities(expected, run_example(onnx_export, [str(data)], tmp_path / "onnx.csv"))


def test_plain_onnxruntime_script_reads_dicom_as_medclf_does(onnx_export, tiny_run, tmp_path):
    """Every DICOM kind medclf maps (8/12-bit, windowed, rescaled, MONOCHROME1, colour, no extension) gives the
    example script medclf predict's probabilities."""
    from dicomfiles import KINDS, write_dicom, write_kind

    rows, cols = np.mgrid[0:40, 0:52]
    gray = ((rows * 5 + cols * 3) % 256).astype(np.uint8)  # not square: the centre crop runs too
    folder = tmp_path / "dicom"
    for kind in KINDS:
        write_kind(folder / f"{kind}.dcm", gray, kind)
    wide = (gray.astype(np.uint16) * 9 + 100)  # no window: min..max of the image's own values
    write_dicom(folder / "wide.dcm", wide, bits_stored=12)
    write_dicom(folder / "rescaled.dcm", wide, bits_stored=12, window=(1200.0, 1500.0),
                RescaleSlope="0.5", RescaleIntercept="-20")
    write_dicom(folder / "1.2.840.1", wide, "MONOCHROME1", bits_stored=12)  # a UID name, no image extension
    assert main(["predict", str(tiny_run), str(folder), "--out", str(tmp_path / "torch.csv")]) == 0
    expected = probabilities(tmp_path / "torch.csv")
    assert len(expected) == len(KINDS) + 3
    assert_same_probabilities(expected, run_example(onnx_export, [str(folder)], tmp_path / "onnx.csv"))


def test_default_export_folder_is_beside_the_run(tiny_run):
    manifest = medclf.export(tiny_run)
    assert Path(manifest["folder"]) == tiny_run.with_name(tiny_run.name + "-export")
    assert (Path(manifest["folder"]) / "model.onnx").is_file()


def test_torchscript_export_reproduces_predict(tiny_run, tmp_path):
    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    manifest = json.loads((tmp_path / "ts" / "manifest.json").read_text())
    scripted = torch.jit.load(str(tmp_path / "ts" / manifest["files"]["model"]))
    loaded = load_for_inference(tiny_run)
    store = input_store(loaded.ckpt, [str(tiny_run.parent / "data" / "val")])
    with torch.no_grad():
        exported = scripted(store.images).numpy()
    np.testing.assert_allclose(exported, loaded.predict(store), atol=PARITY)


def two_member_ensemble(tiny_run: Path, path: Path) -> tuple[dict, dict]:
    """The tiny run and a copy with its weights scaled by 0.9, saved as one ensemble checkpoint at `path`."""
    ckpt = read_checkpoint(tiny_run)
    other = {**ckpt, "state_dict": {k: v * 0.9 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}}
    torch.save(ensemble_checkpoint([ckpt, other]), path)
    return ckpt, other


def test_ensemble_exports_as_one_graph_of_mean_probabilities(tiny_run, tmp_path):
    ckpt, other = two_member_ensemble(tiny_run, tmp_path / "model.pt")
    data = str(tiny_run.parent / "data" / "val")
    manifest = medclf.export(tmp_path / "model.pt", out=tmp_path / "export")
    assert manifest["model"]["ensemble_members"] == 2
    medclf.predict(str(tmp_path / "model.pt"), [data], out=str(tmp_path / "torch.csv"))
    members = []
    for i, member in enumerate((ckpt, other)):
        torch.save(member, tmp_path / f"m{i}.pt")
        members.append(probabilities_of(medclf.predict(str(tmp_path / f"m{i}.pt"), [data], out=None)))
    expected = probabilities(tmp_path / "torch.csv")
    assert_same_probabilities({k: (members[0][k] + members[1][k]) / 2 for k in expected}, expected)
    assert_same_probabilities(expected, run_example(tmp_path / "export", [data], tmp_path / "onnx.csv"))


def probabilities_of(rows: list[dict]) -> dict[str, np.ndarray]:
    return {row["path"]: np.array([v for k, v in row.items() if k.startswith("prob_")]) for row in rows}


@pytest.mark.slow
@pytest.mark.skipif(not CHEST.is_dir(), reason="../shared/datasets/chest_xray_400 not present")
def test_onnx_parity_on_the_shared_chest_xrays(tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(CHEST), "--epochs", "1", "--size", "64", "--batch-size", "32", "--folds", "0",
                 "--patience", "0", "--out", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    val = [str(CHEST / "val")]
    assert main(["predict", str(run), *val, "--out", str(tmp_path / "torch.csv")]) == 0
    expected = probabilities(tmp_path / "torch.csv")
    assert len(expected) == 100
    assert_same_probabilities(expected, run_example(tmp_path / "export", val, tmp_path / "onnx.csv"))
    for engine in ("onnx", "openvino"):
        assert main(["predict", str(run), *val, "--engine", engine, "--out", str(tmp_path / f"{engine}.csv")]) == 0
        assert_same_probabilities(expected, probabilities(tmp_path / f"{engine}.csv"))


@pytest.mark.slow
@pytest.mark.skipif(not PNEUMONIAMNIST.is_file(), reason="../shared/datasets/pneumoniamnist_28_trainval.npz not present")
def test_onnx_parity_on_pneumoniamnist_rows(tiny_run, tmp_path):
    # the tiny run's small-stem network is size-agnostic: the same weights read PneumoniaMNIST's 28 px rows
    ckpt = {**read_checkpoint(tiny_run), "classes": ["0", "1"], "input_size": 28, "store_size": 28, "config": {}}
    torch.save(ckpt, tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "export")]) == 0
    assert main(["predict", str(tmp_path / "model.pt"), str(PNEUMONIAMNIST), "--split", "val",
                 "--out", str(tmp_path / "torch.csv")]) == 0
    expected = probabilities(tmp_path / "torch.csv")
    assert len(expected) == 524
    assert_same_probabilities(expected, run_example(tmp_path / "export", [f"{PNEUMONIAMNIST}:val"],
                                                    tmp_path / "onnx.csv"))


# --- the ONNX engine of predict -------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["onnx", "openvino"])
@pytest.mark.parametrize("tta", [False, True])
def test_graph_engines_give_the_torch_engines_probabilities(tiny_run, tmp_path, tta, engine):
    data = [str(tiny_run.parent / "data" / "val")]
    torch_rows = medclf.predict(str(tiny_run), data, out=str(tmp_path / "torch.csv"), tta=tta)
    graph_rows = medclf.predict(str(tiny_run), data, out=str(tmp_path / "graph.csv"), tta=tta, engine=engine)
    assert_same_probabilities(probabilities(tmp_path / "torch.csv"), probabilities(tmp_path / "graph.csv"))
    assert [r["prediction"] for r in torch_rows] == [r["prediction"] for r in graph_rows]
    header = (tmp_path / "torch.csv").read_text().splitlines()[0]
    assert (tmp_path / "graph.csv").read_text().splitlines()[0] == header  # same file format


def test_engine_auto_picks_the_fastest_installed_graph_engine(tiny_run, monkeypatch):
    chosen = load_for_inference(tiny_run, engine="auto")
    assert isinstance(chosen, GraphModel) and chosen.engine == "openvino" and chosen.precision == "fp32"
    monkeypatch.setattr(inference, "openvino_engine_available", lambda: False)
    assert load_for_inference(tiny_run, engine="auto").engine == "onnx"
    monkeypatch.setattr(inference, "onnx_engine_available", lambda: False)
    assert isinstance(load_for_inference(tiny_run, engine="auto"), LoadedModel)
    assert isinstance(load_for_inference(tiny_run, engine="torch"), LoadedModel)


def test_int8_engines_agree_and_stay_close_to_fp32(tiny_run, tmp_path, capsys):
    """--precision int8 quantizes the cached export once (calibrated on the run's training images) and both graph
    engines run it: close to fp32, not equal to it, with the softmax left in float."""
    data = [str(tiny_run.parent / "data" / "val")]
    fp32 = probabilities_of(medclf.predict(str(tiny_run), data, out=None))
    ort8 = probabilities_of(medclf.predict(str(tiny_run), data, out=None, engine="onnx", precision="int8"))
    ov8 = probabilities_of(medclf.predict(str(tiny_run), data, out=None, engine="openvino", precision="int8"))
    assert sorted(fp32) == sorted(ort8) == sorted(ov8)
    ckpt = read_checkpoint(tiny_run)
    int8_file = cached_onnx(ckpt, resolve_model_path(tiny_run)).with_name("model.int8.onnx")
    report = json.loads(int8_file.with_name("int8.json").read_text())
    assert int8_file.is_file() and report["calibrated_on"] == "training split"
    keys = sorted(fp32)
    f, o, v = (np.stack([d[k] for k in keys]) for d in (fp32, ort8, ov8))
    assert np.abs(v - f).max() < 0.02 and np.abs(o - f).max() < 0.02  # int8 rounding, not another model
    assert not np.allclose(o, f, atol=1e-6) and not np.allclose(v, f, atol=1e-6)  # really int8
    assert len(np.unique(v[:, 1])) > len(v) // 2  # probabilities in float, not multiples of 1/255
    import onnx
    from onnx import numpy_helper

    weights = {w.name: numpy_helper.to_array(w) for w in onnx.load(str(int8_file)).graph.initializer
               if w.data_type == onnx.TensorProto.INT8 and w.dims and len(w.dims) == 4}
    stem = [w for name, w in weights.items() if name.startswith("model.conv1.")]
    assert len(stem) == 1 and np.abs(stem[0].astype(int)).max() <= 64  # 7-bit: no VPMADDUBSW saturation
    assert max(np.abs(w.astype(int)).max() for w in weights.values()) == 127  # the deeper layers keep 8 bits


def test_engine_export_is_cached_by_weights(tiny_run, tmp_path):
    ckpt = read_checkpoint(tiny_run)
    first = cached_onnx(ckpt, resolve_model_path(tiny_run))
    stamp = first.stat().st_mtime_ns
    assert cached_onnx(ckpt, resolve_model_path(tiny_run)) == first and first.stat().st_mtime_ns == stamp
    changed = {**ckpt, "state_dict": {k: v + 1 if k == "fc.bias" else v for k, v in ckpt["state_dict"].items()}}
    torch.save(changed, tmp_path / "model.pt")
    assert cached_onnx(changed, tmp_path / "model.pt") != first


@pytest.mark.parametrize("recipe", ["GRAPH_RECIPE", "INT8_RECIPE"])
def test_engine_export_is_made_again_when_the_export_changes(tiny_run, monkeypatch, recipe):
    """medclf's version string need not change between builds: a new way of building the graph or of
    quantizing it must not find the old files."""
    from medclf import exporting

    ckpt = read_checkpoint(tiny_run)
    first = cached_onnx(ckpt, resolve_model_path(tiny_run))
    monkeypatch.setattr(exporting, recipe, getattr(exporting, recipe) + " changed")
    assert cached_onnx(ckpt, resolve_model_path(tiny_run)) != first


# --- int8 ----------------------------------------------------------------------------------------------------------

def test_int8_export_reports_validation_change_and_speed(tiny_run, tmp_path):
    manifest = medclf.export(tiny_run, out=tmp_path / "q", quantize="int8")
    report = manifest["quantization"]
    assert (tmp_path / "q" / "model.int8.onnx").is_file() and manifest["files"]["int8"] == "model.int8.onnx"
    assert report["validation_images"] == 16 and 0 < report["calibration_images"] <= 48
    for key in ("accuracy", "auc"):
        assert report["change"][key] == pytest.approx(report["int8"][key] - report["fp32"][key])
    assert report["speedup"] == pytest.approx(report["int8"]["images_per_s"] / report["fp32"]["images_per_s"])
    within = all(abs(report["change"][k]) <= limit for k, limit in INT8_TOLERANCE.items())
    assert report["within_tolerance"] == within
    assert manifest["recommended_model"] == ("model.int8.onnx" if within else "model.onnx")


def test_int8_calibration_draws_only_recorded_training_images(tmp_path):
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    store = Store(images, torch.zeros(10, dtype=torch.int64), [f"img{i}" for i in range(10)])
    (tmp_path / "splits.csv").write_text("split,id,label\n" + "".join(
        f"{'train' if i % 2 else 'val'},img{i},a\n" for i in range(10)))
    batch = calibration_batch(store, tmp_path / "splits.csv", count=100, seed=0)
    assert sorted(batch[:, 0, 0, 0].tolist()) == [1, 3, 5, 7, 9]
    assert len(calibration_batch(store, tmp_path / "splits.csv", count=2, seed=0)) == 2


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["export", "{tmp}/nothing"], "model not found"),
    (["export", "{run}", "--format", "torchscript", "--quantize", "int8"], "--quantize int8 needs --format onnx"),
    (["export", "{run}", "--out", "{tmp}/file.txt"], "is a file"),
    (["predict", "{run}", "{tmp}", "--engine", "onnx", "--device", "cuda"], "--engine onnx runs on the CPU"),
    (["predict", "{run}", "{tmp}", "--engine", "openvino", "--device", "cuda"], "--engine openvino runs on the CPU"),
    (["predict", "{run}", "{tmp}", "--precision", "int8"], "--precision int8 runs on the exported graph"),
    (["predict", "{run}", "{tmp}", "--engine", "onnx", "--precision", "bf16"], "--precision 'bf16' with --engine onnx"),
])
def test_export_bad_input_is_one_line_and_exit_2(argv, needle, tiny_run, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, run=tiny_run) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medclf: error: ") and err.count("\n") == 1 and needle in err, err


def test_quantize_without_data_is_one_line(tiny_run, tmp_path, capsys):
    ckpt = {**read_checkpoint(tiny_run), "config": {}}
    torch.save(ckpt, tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt"), "--quantize", "int8", "--out", str(tmp_path / "q")]) == 2
    assert "give --data DATA" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "RGBA", "P", "LA", "1"])
@pytest.mark.parametrize("channels", [1, 3])
def test_example_decodes_every_pixel_mode_as_medclf_does(mode, channels, tmp_path):
    # the example must not import medclf, so it carries its own copy of the decode rule: this keeps them equal
    import runpy

    from PIL import Image

    from medclf.data.store import _to_channels, decode_image

    example = runpy.run_path(str(EXAMPLE))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60000 if mode == "I;16" else 256, (30, 40, 4 if "A" in mode else 3))
    if mode in ("RGB", "RGBA"):
        img = Image.fromarray(pixels[..., :len(mode)].astype(np.uint8), mode)
    elif mode == "I;16":
        img = Image.fromarray(pixels[..., 0].astype(np.uint16))  # Pillow picks I;16
    else:
        img = Image.fromarray(pixels[..., :3].astype(np.uint8), "RGB").convert(mode)
    img.save(tmp_path / "x.png")
    expected = _to_channels(decode_image(str(tmp_path / "x.png"), 16), channels)
    np.testing.assert_array_equal(example["decode"](tmp_path / "x.png", 16, channels), expected)


def test_exported_output_follows_the_checkpoints_task(tiny_run):
    from medclf.exporting import Deployable, example_input
    from medclf.inference import preprocess
    from medclf.models import load_model

    model, ckpt = load_model(tiny_run)
    images = example_input(ckpt)
    with torch.no_grad():
        logits = model(preprocess(ckpt, images))
        torch.testing.assert_close(Deployable(model, ckpt)(images), logits.softmax(1))
        torch.testing.assert_close(Deployable(model, {**ckpt, "task": "multi-label"})(images), logits.sigmoid())


@pytest.mark.parametrize("in_chans, size, bias", [(1, 224, False), (3, 64, True), (1, 33, False)])
def test_space_to_depth_stem_computes_the_7x7_stride_2_stem(in_chans, size, bias):
    from medclf.exporting import SpaceToDepthStem

    torch.manual_seed(0)
    conv = nn.Conv2d(in_chans, 8, kernel_size=7, stride=2, padding=3, bias=bias).double()
    x = torch.randn(2, in_chans, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = conv(x), SpaceToDepthStem(conv)(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_deployable_rewrites_every_imagenet_stem_and_leaves_the_callers_model_alone():
    from medclf.exporting import SpaceToDepthStem, with_space_to_depth_stems
    from medclf.models import Ensemble, build_model

    torch.manual_seed(0)
    ensemble = Ensemble([build_model("resnet18", 2, 1, "imagenet"), build_model("resnet18", 2, 1, "small")]).eval()
    rewritten = with_space_to_depth_stems(ensemble)
    assert isinstance(rewritten.members[0].conv1, SpaceToDepthStem)
    assert isinstance(rewritten.members[1].conv1, nn.Conv2d)  # the 3×3 small stem is not rewritten
    assert isinstance(ensemble.members[0].conv1, nn.Conv2d)  # the original is untouched
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), ensemble(x), rtol=1e-4, atol=1e-5)


def test_int8_quantizes_every_convolution_and_keeps_the_preprocessing_in_float(tiny_run, tmp_path):
    import onnx

    from medclf.quantize import float_nodes_and_stem_weights

    two_member_ensemble(tiny_run, tmp_path / "model.pt")
    medclf.export(tmp_path / "model.pt", out=tmp_path / "export")
    nodes = onnx.load(str(tmp_path / "export" / "model.onnx"), load_external_data=False).graph.node
    kinds = {node.name: node.op_type for node in nodes}
    kept, stems = float_nodes_and_stem_weights(tmp_path / "export" / "model.onnx")
    assert "Conv" not in [kinds[name] for name in kept]  # both members' stems included
    assert sum(kind == "Conv" for kind in kinds.values()) > 2 * 10  # two whole ResNet-18s
    assert "GridSample" in [kinds[name] for name in kept] and kinds[kept[-1]] in ("Softmax", "Sigmoid")
    assert len(stems) == 2 and len(set(stems)) == 2  # one stem per member gets 7-bit weights
    preprocessed = {out for node in nodes if node.name in kept for out in node.output}
    assert all(node.input[0] in preprocessed for node in nodes if node.op_type == "Conv" and node.input[1] in stems)


def test_int8_tolerance_holds_a_change_of_exactly_the_limit():
    from medclf.quantize import within_tolerance

    tolerance = {"accuracy": 0.01, "auc": 0.005}
    one_image_of_100 = 0.87 - 0.86  # 0.010000000000000009 in float
    assert within_tolerance({"accuracy": one_image_of_100, "auc": -0.005}, tolerance)
    assert not within_tolerance({"accuracy": 0.02, "auc": 0.0}, tolerance)
    assert not within_tolerance({"accuracy": 0.0, "auc": None}, tolerance)
