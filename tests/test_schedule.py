"""A schedule that completes: the rate reaches 0 on the last step however training ends (epochs, time budget,
early stopping, saturated validation), and the decision survives --resume."""
import csv
import json

import pytest
import torch

import medclf
from medclf import schedule, training
from medclf.config import TrainConfig
from medclf.metrics import METHOD_VAL, METHOD_VAL_SELECTED
from medclf.planning import make_plan

from conftest import write_class_folders


@pytest.mark.parametrize("total,warmup", [(20, 0), (20, 5), (7, 3), (3, 1), (100, 10)])
def test_lr_factor_warms_up_then_reaches_zero_exactly_on_the_last_step(total, warmup):
    lrs = [schedule.lr_factor(step, total, warmup) for step in range(total)]
    assert lrs[:warmup] == pytest.approx([(i + 1) / warmup for i in range(warmup)])
    assert lrs[-1] == 0.0 and all(lr > 0 for lr in lrs[:-1])
    decay = lrs[warmup:]
    assert decay[0] == 1.0 and all(a > b for a, b in zip(decay, decay[1:]))
    assert schedule.lr_factor(3, total, 0, "constant") == 1.0


@pytest.mark.parametrize("start,last", [(30, 40), (30, 30), (6, 9), (60, 99)])
def test_an_early_end_continues_the_rate_and_anneals_it_to_zero_on_its_last_step(start, last):
    sched = schedule.Schedule(total=100, warmup=5, kind="cosine")
    before = [sched(s) for s in range(start)]
    rate_at_start = sched(start)
    sched.finish_at(start, last)
    assert [sched(s) for s in range(start)] == before  # the past is not rewritten
    if last > start:
        assert sched(start) == pytest.approx(rate_at_start)  # no jump where the end begins
    tail = [sched(s) for s in range(start, last + 1)]
    assert tail[-1] == 0.0 and all(a >= b for a, b in zip(tail, tail[1:]))
    assert sched.last_step == last and not sched.done(last) and sched.done(last + 1)


def test_finish_at_never_lengthens_the_schedule():
    sched = schedule.Schedule(total=50, warmup=0, kind="cosine")
    sched.finish_at(10, 20)
    sched.finish_at(12, 30)  # a later end than the one planned changes nothing
    assert sched.last_step == 20
    sched.finish_at(12, 15)  # an earlier one moves it forward, from the current rate
    assert sched.last_step == 15 and sched(15) == 0.0
    plain = schedule.Schedule(total=50, warmup=0, kind="cosine")
    plain.finish_at(5, 49)  # the planned last step: nothing to change
    assert plain.end is None


def test_the_early_end_is_saved_in_the_scheduler_state():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = schedule.make_scheduler(TrainConfig(epochs=10), opt, 10)
    schedule.schedule_of(sched).finish_at(30, 40)
    fresh = schedule.make_scheduler(TrainConfig(epochs=10), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10)
    fresh.load_state_dict(sched.state_dict())
    assert schedule.schedule_of(fresh).end == schedule.schedule_of(sched).end and schedule.schedule_of(fresh).last_step == 40


def test_saturation_needs_no_errors_twice_or_on_many_images():
    perfect, miss = {"val_accuracy": 1.0}, {"val_accuracy": 0.99}
    assert not schedule.saturated([perfect], 100)
    assert schedule.saturated([perfect, perfect], 100)
    assert not schedule.saturated([perfect, miss], 100)
    assert schedule.saturated([perfect], schedule.SATURATED_VAL_IMAGES)
    assert not schedule.saturated([perfect, {"val_accuracy": float("nan")}], 5000)  # a diverged epoch is no saturation


def test_saturation_on_thousands_of_images_allows_a_tenth_of_a_percent_of_errors():
    n = 5895  # MedNIST's validation split: 5 errors are within 0.1%, 6 are not
    assert schedule.saturated([{"val_accuracy": 1 - 5 / n}], n)
    assert not schedule.saturated([{"val_accuracy": 1 - 6 / n}], n)
    assert schedule.saturated([{"val_accuracy": 1 - 1 / 1500}], 1500)  # 0.1% of 1,500 rounds down to 1 ...
    assert not schedule.saturated([{"val_accuracy": 1 - 2 / 1500}], 1500)
    assert schedule.saturated([{"val_accuracy": 1 - 2 / 2000}], 2000)  # ... of 2,000 allows 2
    assert not schedule.saturated([{"val_accuracy": 1 - 1 / 999}, {"val_accuracy": 1 - 1 / 999}], 999)


def test_epochs_that_fit_use_the_slowest_recent_pace():
    assert schedule.epochs_that_fit(100.0, [10.0, 30.0, 20.0]) == 3
    assert schedule.epochs_that_fit(5.0, [10.0]) == 0


# ---------------------------------------------------------------- every way of ending, end to end

def _data(root):
    write_class_folders(root / "train", {"NORMAL": 20, "PNEUMONIA": 20}, seed=1)
    write_class_folders(root / "val", {"NORMAL": 6, "PNEUMONIA": 6}, seed=2)
    return root


def _record_lrs(monkeypatch) -> list[float]:
    lrs: list[float] = []
    real = training.make_optimizer

    def recording(cfg, model):
        optimizer = real(cfg, model)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", recording)
    return lrs


FLAGS = dict(epochs=6, batch_size=16, warmup_epochs=0.5, lr=1e-3, plan=False, progress=False, folds=0)


def _epochs_run(run) -> int:
    with open(run / "history.csv") as f:
        return len(list(csv.DictReader(f)))


def test_training_to_its_planned_epochs_ends_at_zero(tmp_path, monkeypatch):
    lrs = _record_lrs(monkeypatch)
    medclf.train(data=str(_data(tmp_path / "d")), patience=0, stop_saturated=False, out=str(tmp_path / "run"), **FLAGS)
    assert len(lrs) == 6 * 3 and lrs[-1] == 0.0 and min(lrs[:-1]) > 0


def test_early_stopping_finishes_the_schedule_instead_of_cutting_it(tmp_path, monkeypatch):
    lrs = _record_lrs(monkeypatch)
    scores = iter([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])  # the monitored score only falls: patience 1 ends it after epoch 2
    monkeypatch.setattr(training, "monitor_score", lambda row, monitor: next(scores))
    run = tmp_path / "run"
    medclf.train(data=str(_data(tmp_path / "d")), patience=1, stop_saturated=False, out=str(run), **FLAGS)
    assert lrs[-1] == 0.0 and min(lrs[:-1]) > 0
    assert 6 < len(lrs) < 18  # the tail ran, the rest of the plan did not
    assert lrs[6] > 0.5 * 1e-3  # where early stopping struck, the rate was still high
    assert _epochs_run(run) == 3


def test_saturated_validation_finishes_the_schedule(tmp_path, monkeypatch):
    lrs = _record_lrs(monkeypatch)
    monkeypatch.setattr(training, "saturated", lambda history, n_val: len(history) >= 1)
    monkeypatch.setattr(training, "min_epochs", lambda n_train: 1)  # 40 images: the plan's floor would be 15
    run = tmp_path / "run"
    medclf.train(data=str(_data(tmp_path / "d")), patience=0, out=str(run), **FLAGS)
    assert lrs[-1] == 0.0 and min(lrs[:-1]) > 0 and len(lrs) < 18
    assert _epochs_run(run) == 2


@pytest.mark.parametrize("saturates", [True, False])
def test_a_saturated_run_keeps_its_final_weights_not_the_best_epoch(tmp_path, monkeypatch, saturates):
    """checkpoint=best: validation's best epoch is kept unless validation saturates; then epochs differ by a
    few images, and the annealed final weights are kept (and the estimate did not select them)."""
    scores = iter([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])  # epoch 1 is the best by the monitored score
    monkeypatch.setattr(training, "monitor_score", lambda row, monitor: next(scores))
    monkeypatch.setattr(training, "saturated", lambda history, n_val: saturates and len(history) >= 2)
    monkeypatch.setattr(training, "min_epochs", lambda n_train: 1)
    run = tmp_path / "run"
    flags = {**FLAGS, "epochs": 4}
    medclf.train(data=str(_data(tmp_path / "d")), patience=0, checkpoint="best", ema=0.0, out=str(run), **flags)
    kept = torch.load(run / "model.pt", weights_only=False)
    last = torch.load(run / "last.pt", weights_only=False)
    estimate = json.loads((run / "metrics.json").read_text())["estimate"]
    if saturates:  # saturated after epoch 2, annealed over epoch 3: model.pt holds epoch 3's weights
        assert _epochs_run(run) == 3 and kept["epoch"] == 3 == last["epoch"]
        assert all(torch.equal(kept["state_dict"][name], weights) for name, weights in last["state_dict"].items())
        assert estimate["method"] == METHOD_VAL
    else:
        assert _epochs_run(run) == 4 and kept["epoch"] == 1
        assert estimate["method"] == METHOD_VAL_SELECTED


def test_saturation_during_warm_up_still_trains_the_plans_minimum_epochs(tmp_path, monkeypatch):
    """Validation right after epoch 1 (mostly warm-up) does not end training before min_epochs: the schedule
    is finished at that floor instead, annealing to 0 on its last step."""
    lrs = _record_lrs(monkeypatch)
    monkeypatch.setattr(training, "saturated", lambda history, n_val: len(history) >= 1)
    monkeypatch.setattr(training, "min_epochs", lambda n_train: 3)
    run = tmp_path / "run"
    medclf.train(data=str(_data(tmp_path / "d")), patience=0, out=str(run), **{**FLAGS, "epochs": 8})
    steps = 3  # 40 images in batches of 16
    assert _epochs_run(run) == 3 and len(lrs) == 3 * steps
    assert lrs[-1] == 0.0 and min(lrs[:-1]) > 0


def test_a_binding_time_budget_finishes_the_schedule_on_time(tmp_path, monkeypatch):
    lrs = _record_lrs(monkeypatch)
    left = iter([2, 1, 0, 0, 0, 0])  # after epoch 1 two more epochs fit, then one: the end moves forward
    monkeypatch.setattr(training, "epochs_that_fit", lambda seconds, paces: next(left))
    run = tmp_path / "run"
    medclf.train(data=str(_data(tmp_path / "d")), patience=0, stop_saturated=False, time_budget=10.0, out=str(run), **FLAGS)
    assert _epochs_run(run) == 3 and len(lrs) == 9
    assert lrs[-1] == 0.0 and min(lrs[:-1]) > 0


def test_resume_keeps_the_early_end(tmp_path, monkeypatch):
    """Interrupted after the end was brought forward: the resumed run trains to that end, not to the old plan."""
    monkeypatch.setattr(training, "saturated", lambda history, n_val: len(history) == 1)
    monkeypatch.setattr(training, "min_epochs", lambda n_train: 1)
    run = tmp_path / "run"
    data = _data(tmp_path / "d")
    flags = {**FLAGS, "epochs": 6}
    real = training.write_history

    def stop_after_first(path, history):
        real(path, history)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "write_history", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        medclf.train(data=str(data), patience=0, out=str(run), **flags)
    monkeypatch.setattr(training, "write_history", real)
    lrs = _record_lrs(monkeypatch)
    medclf.train(resume=str(run), progress=False)
    assert 0 < len(lrs) <= 3 and lrs[-1] == 0.0 and _epochs_run(run) == 2


# ---------------------------------------------------------------- the plan's checkpoint rule

def _fp(n_train, n_val, smallest=None):
    small = n_train // 2 if smallest is None else smallest
    counts = {"train": {"a": small, "b": n_train - small}, "val": {"a": n_val // 2, "b": n_val - n_val // 2}}
    if smallest is not None:
        counts["val"] = {"a": 0, "b": n_val}
    return {"data": "x", "name": "x", "kind": "npz", "classes": ["a", "b"], "num_classes": 2, "counts": counts,
            "images": {"train": n_train, "val": n_val}, "imbalance_ratio": 1.0, "short_side": {"median": 28},
            "channels": 1, "bit_depth": 8}


def test_the_plan_keeps_final_weights_unless_validation_can_rank_epochs():
    small = make_plan(_fp(5000, 524), fixed={"epochs": 5})
    large = make_plan(_fp(40000, 5000), fixed={"epochs": 5})
    assert small["settings"]["checkpoint"] == "final" and "524 validation images" in small["reasons"]["checkpoint"]
    assert large["settings"]["checkpoint"] == "best" and "5000 validation images" in large["reasons"]["checkpoint"]


def test_the_plan_cross_validates_small_data_and_says_so():
    small = make_plan(_fp(200, 100), fixed={"epochs": 5})
    big = make_plan(_fp(5000, 524), fixed={"epochs": 5})
    assert small["settings"]["folds"] == 5 and "300 train+val images" in small["reasons"]["folds"]
    assert small["settings"]["checkpoint"] == "final" and small["settings"]["patience"] == 0
    assert big["settings"]["folds"] == 0
    assert make_plan(_fp(200, 100), fixed={"epochs": 5, "folds": 0})["settings"]["folds"] == 0


def test_the_plan_does_not_cross_validate_a_class_too_small_for_the_folds():
    plan = make_plan(_fp(200, 100, smallest=3), fixed={"epochs": 5})
    assert plan["settings"]["folds"] == 0 and "smallest class has 3" in plan["reasons"]["folds"]


# ---------------------------------------------------------------- edge cases of ending early

def test_an_end_inside_the_warm_up_still_reaches_the_peak():
    sched = schedule.Schedule(total=100, warmup=20, kind="cosine")
    sched.finish_at(5, 40)
    rates = [sched(s) for s in range(41)]
    assert max(rates) == 1.0 and rates[19] == 1.0 and rates[40] == 0.0


def test_a_constant_rate_runs_on_while_whole_epochs_fit_the_budget():
    cfg = TrainConfig(epochs=50, schedule="constant", patience=0, stop_saturated=False, time_budget=5.0)
    history = [{"seconds": 10.0, "val_accuracy": 0.5}]
    import time
    far = time.perf_counter() + 290  # 29 epochs of 10 s still fit, 49 are planned
    assert training._early_end(cfg, history, 0, 10, far, 0, 3, None, 3, False) is None
    near = time.perf_counter() + 5  # not one more epoch fits: stop now
    assert training._early_end(cfg, history, 0, 10, near, 0, 3, None, 3, False)[1] is True


def test_a_refit_history_without_validation_counts_no_bad_epochs():
    rows = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}]
    assert training._epochs_since_best(rows, "loss") == 0


def test_the_first_epoch_does_not_set_the_pace_once_there_are_others():
    assert schedule.epochs_that_fit(100.0, [40.0, 10.0, 10.0]) == 10
    assert schedule.epochs_that_fit(100.0, [40.0]) == 2
