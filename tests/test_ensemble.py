"""Ensemble checkpoints (issue #10): one model.pt of K same-spec models that every command accepts."""
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, roc_auc_score

import medclf
from medclf import atomic, gradcam, models
from medclf.cli import main
from medclf.comparison import evaluate_arms
from medclf.reporting import run_report

from conftest import FAST_FLAGS, make_image, make_split_folder


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """Two one-epoch runs (different seeds) and their ensemble: a copy of the first run whose model.pt is the
    ensemble, with the members' model.pt in fold1/ and fold2/ beside it."""
    base = tmp_path_factory.mktemp("ensemble")
    data = make_split_folder(base / "xray")
    runs = [base / "a", base / "b"]
    for seed, run in enumerate(runs):
        assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--seed", str(seed), "--out", str(run)]) == 0
    ens = base / "ens"
    shutil.copytree(runs[0], ens)
    members = [models.read_checkpoint(run) for run in runs]
    for i, run in enumerate(runs, 1):
        (ens / f"fold{i}").mkdir()
        shutil.copy(run / "model.pt", ens / f"fold{i}" / "model.pt")
    atomic.torch_save(models.ensemble_checkpoint(members, {"config": members[0]["config"]}), ens / "model.pt")
    return data, runs, ens


def _probabilities(run_or_model, data, tmp_path, name: str) -> np.ndarray:
    rows = medclf.predict(str(run_or_model), [str(data)], split="test", out=str(tmp_path / name))
    return np.array([[row["prob_NORMAL"], row["prob_PNEUMONIA"]] for row in rows])


def _ensemble_copy(ensemble_run, tmp_path, change) -> str:
    """The ensemble's model.pt with `change` applied to its dict, saved under tmp_path."""
    ckpt = torch.load(ensemble_run[2] / "model.pt", weights_only=True)
    change(ckpt)
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    return str(path)


def test_ensemble_predicts_the_mean_member_probability(ensemble_run, tmp_path):
    data, runs, ens = ensemble_run
    member_probs = [_probabilities(run, data, tmp_path, f"{run.name}.csv") for run in runs]
    assert not np.allclose(member_probs[0], member_probs[1], atol=1e-3)  # else the mean would prove nothing
    ensemble_probs = _probabilities(ens, data, tmp_path, "ens.csv")
    np.testing.assert_allclose(ensemble_probs, np.mean(member_probs, 0), atol=1e-5)


def test_checkpoint_loads_weights_only_into_an_ensemble(ensemble_run):
    _, runs, ens = ensemble_run
    ckpt = torch.load(ens / "model.pt", weights_only=True)  # plain values and tensors only: nothing pickled
    assert ckpt["ensemble"] == 2 and "threshold" not in ckpt  # each member's own threshold is not the ensemble's
    assert ckpt["config"] == models.read_checkpoint(runs[0])["config"]
    model, _ = models.load_model(ens)
    assert isinstance(model, models.Ensemble) and len(model.members) == 2
    for member, run in zip(model.members, runs):
        assert torch.equal(member.fc.weight, models.read_checkpoint(run)["state_dict"]["fc.weight"])


def test_evaluate_on_an_ensemble_matches_sklearn(ensemble_run, tmp_path, capsys):
    data, runs, ens = ensemble_run
    probs = np.mean([_probabilities(run, data, tmp_path, f"{run.name}.csv") for run in runs], 0)
    labels = np.array([0] * 8 + [1] * 8)  # make_split_folder's test split, read in class order
    result = medclf.evaluate(str(ens), str(data))["test"]
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert result["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert main(["evaluate", str(ens / "model.pt"), str(data), "--out", str(tmp_path / "m.json")]) == 0
    assert (tmp_path / "m.json").is_file()


def test_explain_an_ensemble(ensemble_run, tmp_path):
    data, _, ens = ensemble_run
    images = sorted((data / "test" / "PNEUMONIA").glob("*.png"))[:3]
    rows = medclf.explain(str(ens), [str(p) for p in images], out=tmp_path / "cams")
    predicted = medclf.predict(str(ens), [str(p) for p in images], out=None)
    assert [(r["prediction"], r["explained_class"]) for r in rows] == [(r["prediction"],) * 2 for r in predicted]
    assert [r["probability"] for r in rows] == pytest.approx([r[f"prob_{r['prediction']}"] for r in predicted])
    assert all((tmp_path / "cams" / f"{p.stem}.gradcam.png").is_file() for p in images)
    assert main(["explain", str(ens), str(images[0]), "--class", "NORMAL", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / f"{images[0].stem}.gradcam.png").is_file()


def test_report_of_an_ensemble_shows_its_grad_cams(ensemble_run, tmp_path, monkeypatch):
    """Each image in both classes of the data: every other prediction is a mistake, so the gallery is drawn."""
    _, _, ens = ensemble_run
    twins = tmp_path / "twins"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for i in range(3):
            image = Image.fromarray(make_image(i % 2, 12, rng))
            for name in ("NORMAL", "PNEUMONIA"):
                (twins / split / name).mkdir(parents=True, exist_ok=True)
                image.save(twins / split / name / f"{i}.png")
    explained = []
    real_grad_cam = run_report.grad_cam

    def recording_grad_cam(model, images, target=None, layer=None):
        explained.append(type(model))
        return real_grad_cam(model, images, target, layer)

    monkeypatch.setattr(run_report, "grad_cam", recording_grad_cam)
    page = medclf.report(ens, data=str(twins), out=tmp_path / "report.html", n_boot=20)
    text = open(page).read()
    assert explained == [models.Ensemble]
    assert "ensemble of 2 × resnet18" in text and 'alt="Grad-CAM"' in text


def test_ensemble_grad_cam_is_the_mean_of_member_maps_for_the_ensembles_class():
    torch.manual_seed(0)
    members = [models.build_model("resnet18", 3, 1, "small") for _ in range(3)]
    ensemble = models.Ensemble(members).train()
    x = torch.randn(6, 1, 12, 12)
    with torch.no_grad():
        target = ensemble.eval()(x).argmax(1)
    ensemble.train()
    expected = torch.stack([gradcam.grad_cam(m, x, target) for m in members]).mean(0)
    assert torch.allclose(gradcam.grad_cam(ensemble, x), expected, atol=1e-6)
    assert all(m.training for m in ensemble.modules())  # modes restored
    other = (target + 1) % 3
    expected_other = torch.stack([gradcam.grad_cam(m, x, other) for m in members]).mean(0)
    assert torch.allclose(gradcam.grad_cam(ensemble, x, other), expected_other, atol=1e-6)
    with pytest.raises(ValueError, match="give no layer"):
        gradcam.grad_cam(ensemble, x, layer=members[0].layer4)


def test_ensemble_output_is_the_log_of_the_mean_probability():
    torch.manual_seed(0)
    members = [models.build_model("resnet18", 3, 1, "small").eval() for _ in range(2)]
    with torch.no_grad():
        members[1].fc.bias.fill_(-200.0)  # probabilities that underflow to 0 in float32
        members[1].fc.bias[0] = 200.0
        x = torch.randn(4, 1, 12, 12)
        out = models.Ensemble(members).eval()(x)
        mean = torch.stack([m(x).softmax(1) for m in members]).mean(0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out.softmax(1), mean, atol=1e-6)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(ensemble=3), "'ensemble' is 3 but 'state_dict' holds 2 member"),
    (lambda c: c.update(ensemble=1), "'ensemble' must be an integer >= 2"),
    (lambda c: c["state_dict"].update({"members.1.fc.weight": torch.zeros(3, 512),
                                       "members.1.fc.bias": torch.zeros(3)}),
     "head \\('members.1.fc.weight' in 'state_dict'\\) has 3 outputs"),
    (lambda c: c["state_dict"].pop("members.0.layer4.1.bn2.running_mean"), "does not match an ensemble of 2 resnet18"),
])
def test_a_damaged_ensemble_is_refused_in_one_line(ensemble_run, tmp_path, capsys, change, message):
    data, _, _ = ensemble_run
    path = _ensemble_copy(ensemble_run, tmp_path, change)
    with pytest.raises(medclf.MedclfError, match=message) as error:
        models.load_model(path)
    assert "\n" not in str(error.value)
    assert main(["evaluate", path, str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medclf: error: ") and "Traceback" not in err


def test_fine_tuning_from_an_ensemble_is_refused_naming_a_member(ensemble_run, tmp_path, capsys):
    data, _, ens = ensemble_run
    member = re.escape(str(ens / "fold1" / "model.pt"))
    with pytest.raises(medclf.MedclfError, match=f"ensemble of 2 models; fine-tune from one of them instead "
                                                 f"\\(e.g. {member}\\)"):
        models.read_base(ens / "model.pt")
    assert models.read_base(ens / "fold2")["classes"] == ["NORMAL", "PNEUMONIA"]
    assert main(["train", str(data), *FAST_FLAGS, "--weights", str(ens / "model.pt"),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ensemble" in err and "Traceback" not in err


@pytest.mark.parametrize("key,value", [("classes", ["healthy", "sick"]), ("input_size", 16), ("mean", [0.4]),
                                       ("crop", 1.0), ("store_size", 24)])
def test_members_of_different_specs_are_refused(ensemble_run, key, value):
    _, runs, _ = ensemble_run
    members = [models.read_checkpoint(run) for run in runs]
    members[1][key] = value
    with pytest.raises(medclf.MedclfError, match=f"ensemble members 1 and 2 differ in '{key}'"):
        models.ensemble_checkpoint(members)
    with pytest.raises(medclf.MedclfError, match="at least 2 models"):
        models.ensemble_checkpoint(members[:1])


def test_compare_scores_an_ensemble_run_like_any_run(ensemble_run, tmp_path):
    data, runs, ens = ensemble_run
    member_probs = [_probabilities(run, data, tmp_path, f"{run.name}.csv") for run in runs]
    _, pooled, _, _ = evaluate_arms(str(data), {"single": [runs[0]], "ensemble": [ens]},
                                    {"single": {}, "ensemble": {}}, [0], {"device": "cpu"}, n_boot=10)
    np.testing.assert_allclose(pooled["ensemble"], np.mean(member_probs, 0), atol=1e-5)
    np.testing.assert_allclose(pooled["single"], member_probs[0], atol=1e-6)
