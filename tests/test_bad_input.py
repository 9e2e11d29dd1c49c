"""Every bad input answered in one line (issue #14): settings, config files and checkpoints through the CLI.

Each row builds its input in a temp folder, runs `medclf` in-process and expects exit code 2 and one
stderr line that names the offending flag, key or file, with no traceback. Validation happens before
any image is decoded, so the table runs in seconds.
"""
import ast
import pathlib
from pathlib import Path

import pytest
import torch
import yaml

import medclf
from medclf import evaluation, models
from medclf.cli import main

from conftest import make_split_folder

SOURCE = Path(medclf.__file__).parent
FAST = ["--epochs", "1", "--batch-size", "16", "--patience", "0", "--no-plan"]
FAST_SETTINGS = {"epochs": 1, "batch_size": 16, "patience": 0, "plan": False}


def valid_checkpoint(classes=("NORMAL", "PNEUMONIA")) -> dict:
    """A self-describing checkpoint as training writes it (random weights: no training needed)."""
    model = models.build_model("resnet18", len(classes), 1, "small")
    spec = models.model_spec("resnet18", list(classes), 1, "small", 12, [0.5], [0.5])
    spec["store_size"], spec["crop"] = 12, 1.0
    return models.checkpoint_dict(model, spec, {"config": {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.1}})


def resume_state() -> dict:
    """last.pt: a checkpoint plus what `--resume` continues from."""
    state = valid_checkpoint()
    model = models.build_model("resnet18", 2, 1, "small")
    optimizer = torch.optim.AdamW(model.parameters())
    state.update({"optimizer": optimizer.state_dict(), "scheduler": {}, "history": [], "best": 0.5, "epoch": 1,
                  "generator": torch.Generator().get_state()})
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folder(tmp_path_factory.mktemp("bad_input") / "xray")


def command_with_checkpoint(command: str, ckpt_path: Path, data: Path, tmp: Path) -> list[str]:
    """argv for each command that reads a checkpoint; --resume and report read it from a run folder."""
    image = str(sorted((data / "test" / "NORMAL").glob("*.png"))[0])
    if command in ("resume", "report"):
        run = tmp / "run"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"data": str(data), "epochs": 1, "batch_size": 16}))
        ckpt_path.rename(run / ("last.pt" if command == "resume" else "model.pt"))
        return ["train", "--resume", str(run)] if command == "resume" else ["report", str(run)]
    return {
        "evaluate": ["evaluate", str(ckpt_path), str(data)],
        "predict": ["predict", str(ckpt_path), str(data / "test"), "--out", str(tmp / "p.csv")],
        "explain": ["explain", str(ckpt_path), image, "--out", str(tmp / "explain")],
        "weights": ["train", str(data), "--weights", str(ckpt_path), "--epochs", "1", "--out", str(tmp / "run")],
        "plan": ["plan", str(data), "--weights", str(ckpt_path), "--no-probe", "--out", "-"],
    }[command]


# ---- the rows: each returns (argv, strings the error line must contain) --------------------------

def train_flags(*flags: str, needle: str):
    """`train DATA` with these flags after the fast ones (the later flag wins), so a miss trains one short epoch."""
    return lambda tmp, data: (["train", str(data), *FAST, *flags, "--out", str(tmp / "run")], [needle])


def plain_argv(*argv: str, needle: str):
    return lambda tmp, data: ([a.replace("DATA", str(data)) for a in argv], [needle])


def config_settings(settings: dict, needle: str):
    """--config with DATA and these settings."""
    def build(tmp, data):
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump({"data": str(data), **FAST_SETTINGS, **settings}))
        return ["train", "--config", str(path)], [needle]
    return build


def config_bytes(content: bytes):
    """--config whose file holds these bytes; the message names the file."""
    def build(tmp, data):
        path = tmp / "config.yaml"
        path.write_bytes(content)
        return ["train", "--config", str(path)], [str(path)]
    return build


def checkpoint(change, needle: str, command: str = "evaluate"):
    """A valid checkpoint with one change, given to `command`; the message names the file and `needle`."""
    def build(tmp, data):
        ckpt = resume_state() if command == "resume" else valid_checkpoint()
        change(ckpt)
        path = tmp / "model.pt"
        torch.save(ckpt, path)
        argv = command_with_checkpoint(command, path, data, tmp)
        name = {"resume": "last.pt", "report": "model.pt"}.get(command, "model.pt")
        return argv, [name, needle]
    return build


def checkpoint_bytes(content, needle: str):
    """A model.pt holding these bytes (or the bytes a function makes) for `evaluate`."""
    def build(tmp, data):
        path = tmp / "model.pt"
        path.write_bytes(content() if callable(content) else content)
        return ["evaluate", str(path), str(data)], [str(path), needle]
    return build


def set_key(key, value):
    return lambda ckpt: ckpt.__setitem__(key, value)


def drop_key(key):
    return lambda ckpt: ckpt.pop(key)


def three_classes_two_outputs(ckpt):
    ckpt["classes"], ckpt["num_classes"] = ["a", "b", "c"], 3


def truncated_checkpoint() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(valid_checkpoint(), buffer)
    return buffer.getvalue()[:5000]


ROWS = [
    # settings, as flags
    pytest.param(train_flags("--lr", "nan", needle="--lr must be > 0"), id="lr-nan"),
    pytest.param(train_flags("--lr", "-1", needle="--lr must be > 0"), id="lr-negative"),
    pytest.param(train_flags("--lr", "inf", needle="--lr"), id="lr-inf"),
    pytest.param(train_flags("--label-smoothing", "1.5", needle="--label-smoothing must be in [0, 1)"), id="smoothing"),
    pytest.param(train_flags("--ema", "1.5", needle="--ema must be in [0, 1)"), id="ema"),
    pytest.param(train_flags("--seed", "-1", needle="--seed"), id="seed-negative"),
    pytest.param(train_flags("--seed", str(2**32), needle="--seed"), id="seed-too-large"),
    pytest.param(train_flags("--weight-decay", "-0.1", needle="--weight-decay"), id="weight-decay"),
    pytest.param(train_flags("--warmup-epochs", "nan", needle="--warmup-epochs"), id="warmup-nan"),
    pytest.param(train_flags("--grad-clip", "-1", needle="--grad-clip"), id="grad-clip"),
    pytest.param(train_flags("--epochs", "0", needle="--epochs must be >= 1"), id="epochs-0"),
    pytest.param(train_flags("--batch-size", "0", needle="--batch-size"), id="batch-size-0"),
    pytest.param(train_flags("--patience", "-1", needle="--patience"), id="patience"),
    pytest.param(train_flags("--size", "4", needle="--size must be >= 8"), id="size"),
    pytest.param(train_flags("--time-budget", "0", needle="--time-budget must be > 0"), id="budget-0"),
    pytest.param(train_flags("--time-budget", "inf", needle="--time-budget"), id="budget-inf"),
    pytest.param(train_flags("--lr", "fast", needle="argument --lr: invalid float value"), id="lr-not-a-number"),
    pytest.param(train_flags("--epochs", "2.5", needle="argument --epochs: invalid int value"), id="epochs-fraction"),
    pytest.param(train_flags("--channels", "2", needle="argument --channels"), id="channels"),
    pytest.param(train_flags("--channels-last", "maybe", needle="--channels-last"), id="bool-flag"),
    pytest.param(train_flags("--device", "gpu0", needle="--device must be auto, cpu, cuda, cuda:N or mps"), id="device"),
    pytest.param(plain_argv("compare", "DATA", "--weights", "none,imagenet", "--seed", str(2**32 - 2), "--seeds", "3",
                            needle="would reach seed"), id="compare-seed-overflow"),
    pytest.param(train_flags("--model", "vgg", needle="argument --model: invalid choice"), id="model"),
    pytest.param(train_flags("--colour", "red", needle="unrecognized arguments: --colour"), id="unknown-flag"),
    pytest.param(plain_argv("train", needle="give DATA, --config or --resume"), id="no-data"),
    pytest.param(plain_argv("trian", "DATA", needle="invalid choice: 'trian'"), id="unknown-command"),
    pytest.param(plain_argv("plan", "DATA", "--time-budget", "-1", "--out", "-", needle="--time-budget"), id="plan-budget"),
    pytest.param(plain_argv("plan", "DATA", "--time-budget", "nan", "--out", "-", needle="--time-budget"),
                 id="plan-budget-nan"),
    pytest.param(plain_argv("plan", "DATA", "--seed", "-1", "--out", "-", needle="--seed"), id="plan-seed"),
    pytest.param(plain_argv("compare", "DATA", "--weights", "none,imagenet", "--seeds", "0", needle="--seeds"),
                 id="compare-seeds"),
    pytest.param(plain_argv("compare", "DATA", "--weights", "none,imagenet", "--lr", "nan", needle="--lr"),
                 id="compare-lr"),
    # settings, from a --config file
    pytest.param(config_settings({"epochs": "ten"}, "--epochs must be an integer (got 'ten')"), id="yaml-epochs-text"),
    pytest.param(config_settings({"epochs": 2.5}, "--epochs must be an integer"), id="yaml-epochs-float"),
    pytest.param(config_settings({"lr": "fast"}, "--lr must be a number or null"), id="yaml-lr-text"),
    pytest.param(config_settings({"lr": [0.1]}, "--lr"), id="yaml-lr-list"),
    pytest.param(config_settings({"tta": "maybe"}, "--tta must be true or false"), id="yaml-bool"),
    pytest.param(config_settings({"model": 18}, "--model must be text"), id="yaml-model-number"),
    pytest.param(config_settings({"val_fraction": 1.5}, "val_fraction must be in (0, 1)"), id="yaml-val-fraction"),
    pytest.param(config_settings({"val_fraction": 0}, "val_fraction"), id="yaml-val-fraction-0"),
    pytest.param(config_settings({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction + test_fraction"),
                 id="yaml-fractions-sum"),
    pytest.param(config_settings({"colour": "red"}, "unknown setting(s) in config: colour"), id="yaml-unknown"),
    pytest.param(config_settings({1: 2}, "unknown setting(s) in config: 1"), id="yaml-number-key"),
    pytest.param(config_bytes(bytes(range(256)) * 4), id="yaml-binary"),
    pytest.param(config_bytes(b"- epochs\n- 3\n"), id="yaml-list"),
    pytest.param(config_bytes(b"epochs: [1\n"), id="yaml-syntax"),
    pytest.param(config_bytes(b"!!python/object/apply:os.system ['true']\n"), id="yaml-python-tag"),
    pytest.param(lambda tmp, data: (["train", "--config", str(tmp / "none.yaml")], [str(tmp / "none.yaml")]),
                 id="yaml-missing"),
    # checkpoints
    pytest.param(checkpoint(drop_key("arch"), "'arch'"), id="ckpt-no-arch"),
    pytest.param(checkpoint(drop_key("classes"), "'classes'"), id="ckpt-no-classes"),
    pytest.param(checkpoint(set_key("classes", []), "'classes' must be a non-empty list"), id="ckpt-classes-empty"),
    pytest.param(checkpoint(set_key("classes", "AB"), "'classes'"), id="ckpt-classes-text"),
    pytest.param(checkpoint(set_key("classes", ["A", "A"]), "'classes'"), id="ckpt-classes-duplicate"),
    pytest.param(checkpoint(set_key("num_classes", 2.0), "'num_classes' must be an integer"), id="ckpt-k-float"),
    pytest.param(checkpoint(set_key("num_classes", 3), "'num_classes'"), id="ckpt-k-wrong"),
    pytest.param(checkpoint(set_key("input_size", 0), "'input_size'"), id="ckpt-input-size-0"),
    pytest.param(checkpoint(set_key("in_chans", 2), "'in_chans'"), id="ckpt-channels"),
    pytest.param(checkpoint(set_key("arch", "vgg16"), "'arch'"), id="ckpt-arch-unknown"),
    pytest.param(checkpoint(set_key("stem", ["small"]), "'stem'"), id="ckpt-stem-list"),
    pytest.param(checkpoint(set_key("mean", [0.5, 0.5, 0.5]), "'mean'"), id="ckpt-mean-length"),
    pytest.param(checkpoint(set_key("std", [0.0]), "'std'"), id="ckpt-std-zero"),
    pytest.param(checkpoint(set_key("crop", 0), "'crop'"), id="ckpt-crop"),
    pytest.param(checkpoint(set_key("threshold", "high"), "'threshold'"), id="ckpt-threshold"),
    pytest.param(checkpoint(set_key("config", ["seed"]), "'config'"), id="ckpt-config-list"),
    pytest.param(checkpoint(set_key("config", {"seed": -3}), "--seed"), id="ckpt-config-seed"),
    pytest.param(checkpoint(set_key("state_dict", [1, 2]), "'state_dict' must be a mapping"), id="ckpt-state-list"),
    pytest.param(checkpoint(set_key("state_dict", {}), "'fc.weight'"), id="ckpt-state-empty"),
    pytest.param(checkpoint(three_classes_two_outputs, "3 names but the head"), id="ckpt-head-vs-classes"),
    pytest.param(checkpoint(set_key("stem", "imagenet"), "does not match a resnet18"), id="ckpt-stem-mismatch"),
    pytest.param(checkpoint(set_key("format", "other/1"), "not a medclf model"), id="ckpt-format"),
    pytest.param(checkpoint_bytes(b"", "cannot load"), id="ckpt-empty-file"),
    pytest.param(checkpoint_bytes(b"hello\n", "not a PyTorch checkpoint"), id="ckpt-text-file"),
    pytest.param(checkpoint_bytes(truncated_checkpoint, "damaged"), id="ckpt-truncated"),
    pytest.param(plain_argv("evaluate", "/no/such/run", "DATA", needle="model not found: /no/such/run"),
                 id="ckpt-missing"),
    # the same schema behind every loader
    pytest.param(checkpoint(three_classes_two_outputs, "the head", "predict"), id="predict-head"),
    pytest.param(checkpoint(set_key("input_size", 0), "'input_size'", "explain"), id="explain-input-size"),
    pytest.param(checkpoint(drop_key("classes"), "'classes'", "weights"), id="weights-no-classes"),
    pytest.param(checkpoint(set_key("state_dict", [1]), "'state_dict'", "plan"), id="plan-weights-state"),
    pytest.param(checkpoint(set_key("num_classes", "2"), "'num_classes'", "report"), id="report-k-text"),
    pytest.param(checkpoint(set_key("classes", []), "'classes'", "resume"), id="resume-classes-empty"),
    pytest.param(checkpoint(drop_key("optimizer"), "not a resume state (no 'optimizer')", "resume"),
                 id="resume-no-optimizer"),
    pytest.param(checkpoint(set_key("epoch", "one"), "'epoch'", "resume"), id="resume-epoch-text"),
    # folders and files (other layers own these; kept here as regression rows)
    pytest.param(plain_argv("train", "/no/such/data", needle="data not found: /no/such/data"), id="data-missing"),
    pytest.param(lambda tmp, data: (["train", str(tmp)], [f"no class sub-folders in {tmp}"]), id="data-empty-folder"),
]


@pytest.mark.parametrize("build", ROWS)
def test_bad_input_is_one_line_and_exit_2(build, data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a row that is wrongly accepted writes its runs here
    argv, needles = build(tmp_path, data)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medclf: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("command", ["evaluate", "predict", "explain"])
def test_the_unchanged_checkpoint_runs(command, data, tmp_path):
    """Control for the checkpoint rows: without the change, the same command succeeds."""
    path = tmp_path / "model.pt"
    torch.save(valid_checkpoint(), path)
    assert main(command_with_checkpoint(command, path, data, tmp_path)) == 0


def test_resume_state_of_the_table_passes_the_schema(tmp_path):
    torch.save(resume_state(), tmp_path / "last.pt")
    assert models.read_resume_state(tmp_path / "last.pt")["epoch"] == 1


class CreatesMarker:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint could do with any function."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def payload_checkpoint(marker: Path) -> dict:
    return {**valid_checkpoint(), "payload": CreatesMarker(marker)}


def test_the_payload_is_live(tmp_path):
    """The crafted file really runs code when unpickled without weights_only (so the next test means something)."""
    marker = tmp_path / "marker"
    torch.save(payload_checkpoint(marker), tmp_path / "model.pt")
    torch.load(tmp_path / "model.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "explain", "weights", "resume", "plan", "report"])
def test_pickle_payload_is_refused_and_runs_nothing(command, data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save(payload_checkpoint(marker), path)
    assert main(command_with_checkpoint(command, path, data, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "refused to load" in err and "Unsupported global" in err
    assert not marker.exists()


def test_every_torch_load_in_medclf_is_weights_only():
    """Reading a checkpoint never unpickles arbitrary objects: each torch.load passes weights_only=True."""
    calls = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                flags = {k.arg: k.value for k in node.keywords}
                safe = isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls, "no torch.load found: the scan is broken"
    assert [where for where, safe in calls if not safe] == []


def test_api_rejects_settings_like_the_cli(data, capsys):
    with pytest.raises(medclf.MedclfError) as api_error:
        medclf.train(data=str(data), lr=-1.0)
    assert main(["train", str(data), "--lr", "-1"]) == 2
    assert capsys.readouterr().err.strip() == f"medclf: error: {api_error.value}"


def test_internal_errors_keep_their_traceback(data, monkeypatch):
    """Only input problems become one line: a bug inside medclf still raises."""
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(evaluation, "split_store", broken)
    path = data.parent / "good.pt"
    torch.save(valid_checkpoint(), path)
    with pytest.raises(ZeroDivisionError):
        main(["evaluate", str(path), str(data)])
