"""Property tests over the training settings (issue #14): any value is either accepted and usable, or
rejected in one line naming the setting, and flags, --config files and the Python API agree on which."""
import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from torch import nn

import medclf
from medclf import runtime
from medclf.cli import main
from medclf.config import TrainConfig, setting_label
from medclf.errors import MedclfError
from medclf.schedule import make_scheduler
from medclf.training import make_optimizer

from conftest import write_class_folders

# the autouse cache fixture is function-scoped; sharing its folder across examples is harmless
SHARED_FIXTURES = [HealthCheck.function_scoped_fixture]
NUMERIC = {"size": int, "epochs": int, "batch_size": int, "lr": float, "weight_decay": float, "warmup_epochs": float,
           "label_smoothing": float, "grad_clip": float, "patience": int, "ema": float, "seed": int,
           "time_budget": float}
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
                      st.lists(st.integers(), max_size=2))


def outcome(**values):
    """("ok", config) or ("error", message) for TrainConfig(**values).validate()."""
    try:
        return "ok", TrainConfig(data="DATA", **values).validate()
    except MedclfError as exc:
        return "error", str(exc)


def number_for(name: str):
    """Values of a numeric setting's own type, in range or not (NaN and infinities included)."""
    if NUMERIC[name] is int:
        return st.integers(-10, 2**33)
    return st.one_of(st.floats(-2.0, 2.0), st.floats())


@st.composite
def numeric_setting(draw, names=tuple(NUMERIC)):
    name = draw(st.sampled_from(names))
    return name, draw(number_for(name))


@given(name=st.sampled_from([f for f in TrainConfig.__dataclass_fields__ if f != "data"]), value=ANY_VALUE)
def test_any_value_is_accepted_or_rejected_in_one_line(name, value):
    verdict, result = outcome(**{name: value})
    if verdict == "error":
        assert setting_label(name) in result and "\n" not in result
    else:  # kept as given: of its annotated type, and a number only when finite (NaN != NaN fails here)
        kept = getattr(result, name)
        assert kept == value and type(kept) is type(value)


@given(lr=st.one_of(st.none(), st.floats()), weight_decay=st.floats(), label_smoothing=st.floats(),
       warmup_epochs=st.floats(-1, 1e6), epochs=st.integers(-1, 10**6), seed=st.integers(-5, 2**33),
       optimizer=st.sampled_from(["adam", "adamw", "sgd"]), schedule=st.sampled_from(["cosine", "constant"]))
@settings(max_examples=150, deadline=None)
def test_accepted_settings_work_in_pytorch(**values):
    """Whatever validate accepts, the optimizer, scheduler, loss and seeding built from it work and stay finite."""
    verdict, cfg = outcome(**values)
    if verdict == "error":
        assert any(setting_label(name) in cfg for name in values)
        return
    model = nn.Linear(3, 2)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, 3)  # 3 optimizer steps per epoch
    loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)(model(torch.ones(4, 3)), torch.tensor([0, 1, 0, 1]))
    assert torch.isfinite(loss)
    peak = optimizer.param_groups[0]["initial_lr"]
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        assert 0 <= optimizer.param_groups[0]["lr"] <= peak and math.isfinite(optimizer.param_groups[0]["lr"])
    runtime.seed_everything(cfg.seed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_class_folders(root / "train", {"A": 8, "B": 8}, size=8, seed=1)
    write_class_folders(root / "val", {"A": 3, "B": 3}, size=8, seed=2)
    return root


@given(setting=numeric_setting())
@settings(max_examples=40, deadline=None, suppress_health_check=SHARED_FIXTURES)
def test_flags_config_and_api_reject_alike(setting, tiny, capsys):
    """A value validate rejects is rejected with the same line as a flag, in a --config file and by medclf.train."""
    name, value = setting
    verdict, message = outcome(**{name: value})
    assume(verdict == "error")
    with pytest.raises(MedclfError) as api:
        medclf.train(data=str(tiny), **{name: value})
    assert str(api.value) == message
    assert main(["train", str(tiny), f"{setting_label(name)}={value!r}"]) == 2
    assert capsys.readouterr().err == f"medclf: error: {message}\n"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({"data": str(tiny), name: value}))
        assert main(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"medclf: error: {message}\n"


@given(setting=numeric_setting(("lr", "label_smoothing", "ema", "weight_decay", "grad_clip", "warmup_epochs")))
@example(setting=("weight_decay", 992911244072.0))  # diverged; the hint once named --lr only
@settings(max_examples=3, deadline=None, suppress_health_check=SHARED_FIXTURES)
def test_train_either_runs_or_exits_2_with_one_line(setting, tiny, capsys):
    name, value = setting
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", str(tiny), "--epochs", "1", "--batch-size", "8", "--patience", "0", "--no-plan",
                f"{setting_label(name)}={value!r}", "--out", str(Path(tmp) / "run")]
        code = main(argv)
        err = capsys.readouterr().err
        if code == 0:
            assert (Path(tmp) / "run" / "metrics.json").is_file()
        else:
            assert code == 2 and err.count("medclf: error: ") == 1 and err.endswith("\n") and "Traceback" not in err
            assert setting_label(name) in err.splitlines()[-1]


def test_paths_are_text_settings(tmp_path):
    cfg = TrainConfig(data=tmp_path / "xray", out=tmp_path / "run").validate()
    assert cfg.data == str(tmp_path / "xray") and cfg.out == str(tmp_path / "run")
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["data"] == cfg.data  # config.yaml can hold it


def test_config_file_reads_exponent_notation_as_numbers(tmp_path):
    """PyYAML's YAML 1.1 reads `1e-3` as text; a hand-written config means the number."""
    from medclf.config import load_yaml

    path = tmp_path / "config.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-5\ntime_budget: 1.5e1\nout: 1e3x\n")
    assert load_yaml(path) == {"lr": 0.001, "weight_decay": 5e-5, "time_budget": 15.0, "out": "1e3x"}
