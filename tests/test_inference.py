"""One input path: predict, evaluate, explain, the report and compare feed a checkpoint the same tensor."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import medclf
from medclf import explanation, inference, models
from medclf.cli import main
from medclf.comparison import evaluate_arms
from medclf.data.augment import prepare_batch

CROP = 0.5


def _bordered_image(size: int = 32, border: int = 8) -> np.ndarray:
    """White border, black centre: a centre crop of half the side shows only the dark centre."""
    image = np.full((size, size), 255, np.uint8)
    image[border:size - border, border:size - border] = 10
    return image


@pytest.fixture
def cropped_run(tmp_path):
    """An untrained checkpoint whose inference crops the centre half, a run folder around it, and data."""
    torch.manual_seed(0)
    spec = models.model_spec("resnet18", ["a", "b"], 1, "small", 32, [0.5], [0.25])
    spec.update({"crop": CROP, "store_size": 32})
    run = tmp_path / "run"
    run.mkdir()
    torch.save(models.checkpoint_dict(models.build_model("resnet18", 2, 1, "small"), spec), run / "model.pt")
    data = tmp_path / "data"
    for split in ("train", "val", "test"):
        for name in ("a", "b"):  # the same picture in both classes: whatever the model says, one is a mistake
            (data / split / name).mkdir(parents=True)
            Image.fromarray(_bordered_image()).save(data / split / name / f"{name}.png")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": str(data), "device": "cpu"}))
    return run, data


def _record_model_inputs(monkeypatch) -> list[torch.Tensor]:
    """Every batch any model loaded for inference is called on, in call order."""
    seen: list[torch.Tensor] = []
    load_model = inference.load_model

    def recording_load_model(path):
        model, ckpt = load_model(path)
        model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu().clone()))
        return model, ckpt

    monkeypatch.setattr(inference, "load_model", recording_load_model)
    return seen


def test_every_consumer_feeds_the_model_the_same_tensor(cropped_run, tmp_path, monkeypatch):
    run, data = cropped_run
    image_file = data / "test" / "a" / "a.png"
    ckpt = models.read_checkpoint(run)
    raw = torch.from_numpy(_bordered_image())[None, None]
    expected = inference.preprocess(ckpt, raw)[0]
    uncropped = prepare_batch(raw, 32, ckpt["mean"], ckpt["std"], 1)[0]
    assert not torch.allclose(expected, uncropped, atol=0.1)  # the crop matters for this image

    seen = _record_model_inputs(monkeypatch)
    medclf.predict(str(run), [str(image_file)], out=None, device="cpu")
    medclf.evaluate(str(run), str(data), split="test", device="cpu")
    medclf.explain(str(run), [str(image_file)], out=tmp_path / "cams", device="cpu")
    medclf.report(run, device="cpu", n_boot=10)
    evaluate_arms(str(data), {"x": [run], "y": [run]}, {"x": {}, "y": {}}, [0], {"device": "cpu"}, n_boot=10)
    fed = [x for batch in seen for x in batch]
    assert len(fed) >= 1 + 2 + 2 + 4 + 1 + 4  # predict, evaluate, explain (+ Grad-CAM), report (+ Grad-CAM), compare
    for x in fed:  # every image is the same picture, so every path must have fed exactly this tensor
        assert torch.equal(x, expected)


def test_gradcam_overlay_shows_the_cropped_view(cropped_run, tmp_path, monkeypatch):

    run, data = cropped_run
    shown = []
    monkeypatch.setattr(explanation, "save_overlay", lambda path, image, cam, title: shown.append(image))
    medclf.explain(str(run), [str(data / "test" / "a" / "a.png")], out=tmp_path / "cams", device="cpu")
    # the centre half is dark; the white border the model never saw must not be shown
    assert shown[0].mean() < 40 and shown[0].max() < 255


def test_import_medclf_is_light():
    code = ("import sys, medclf; heavy = [m for m in ('matplotlib.pyplot', 'sklearn') if m in sys.modules]; "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_output_paths_are_checked_or_created(cropped_run, tmp_path, capsys):
    run, data = cropped_run
    image_file = str(data / "test" / "a" / "a.png")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["evaluate", str(run), str(data), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medclf: error: --out") and "is a folder" in err and err.count("\n") == 1

    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    assert main(["explain", str(run), image_file, "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and err.count("\n") == 1 and a_file.read_text() == "x"

    assert main(["predict", str(run), image_file, "--out", str(a_file / "p.csv")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

    missing = tmp_path / "new" / "deeper" / "p.csv"  # a folder that does not exist yet is clearly meant
    assert main(["predict", str(run), image_file, "--out", str(missing)]) == 0
    assert [r["path"] for r in csv.DictReader(open(missing))] == [image_file]
    metrics = tmp_path / "more" / "m.json"
    assert main(["evaluate", str(run), str(data), "--out", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["test"]["n"] == 2
