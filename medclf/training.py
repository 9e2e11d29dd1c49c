"""The training loop: load data, build the model, train epoch by epoch, keep the best, evaluate."""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import atomic, crossval, distributed, models, rundir, runtime, tasks
from .schedule import epochs_that_fit, make_scheduler, saturated, schedule_of, tail_steps
from .planning import (PLANNED, balance_for, fingerprint, format_plan, make_plan, min_epochs, save_plan,
                       steps_per_epoch)
from .config import TrainConfig, load_yaml, save_yaml
from .data import dicom, sources, splits
from .data.augment import PRESETS, prepare_batch, training_preset
from .data.placement import batch_on_device, place_stores
from .data.chunks import chunked_order
from .data.store import Store, build_store, cache_root, native_size, probe_channels
from .errors import MedclfError
from .evaluation import choose_threshold
from .inference import predict_store
from .metrics import METHOD_VAL, METHOD_VAL_SELECTED, estimate, evaluate_predictions
from .model_card import headline_intervals
from .serialize import json_safe, plain

DIVERGED = "(the model diverged); try a lower --lr or --weight-decay"  # the end of a no-checkpoint error
SATURATED = "validation saturated"  # how a stop reason starts when validation had (almost) no errors left
PROGRESS_EVERY = 25  # steps between the progress bar's loss updates: each one waits for the GPU to catch up
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc",
                   "val_f1_macro", "lr", "seconds"]


def open_data(cfg: TrainConfig) -> sources.Source:
    """DATA's splits, with a validation split carved out of train when it has none."""
    source = sources.open_source(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                 **sources.data_options(cfg.to_dict()))
    if "train" not in source.splits:
        raise MedclfError(f"{cfg.data} has no train split")
    sources.ensure_val_split(source, cfg.val_fraction, cfg.seed)
    return source


def load_data(cfg: TrainConfig, base: dict | None, source: sources.Source | None = None, facts: dict | None = None
              ) -> tuple[sources.Source, dict[str, Store], dict[str, Any], list[str]]:
    """Open DATA, fix input size and channels, decode every split once. Returns source, stores, spec, skipped files.
    `facts`: the plan's fingerprint of DATA, whose measurements are used instead of measuring again."""
    return _load_stores(cfg, base, source if source is not None else open_data(cfg), facts or {})


def _load_stores(cfg: TrainConfig, base: dict | None, source: sources.Source, facts: dict):
    if base:  # fine-tuning a medclf model: its normalisation and stem, the plan's size (weights are size-agnostic)
        input_size, channels, stem = cfg.size or base["input_size"], base["in_chans"], base["stem"]
    else:
        input_size = cfg.size or native_size(source)
        channels = cfg.channels or facts.get("channels") or probe_channels(source, source.splits["train"])
        stem = models.resolve_stem(cfg.stem, input_size)
    store_size = native_size(source) if source.kind == "npz" else input_size
    stores, skipped = {}, []
    for name in source.splits:
        stores[name], bad = build_store(source, name, store_size, channels, skip_bad=cfg.skip_bad,
                                        cache=cfg.cache, cache_dir=cfg.cache_dir, desc=name)
        skipped += bad
    norm = {"mean": base["mean"], "std": base["std"]} if base else models.data_config(cfg.weights, channels)
    spec = models.model_spec(base["arch"] if base else cfg.model, source.classes, channels, stem, input_size, **norm)
    spec["store_size"] = store_size
    if source.task == tasks.MULTILABEL:  # absent: multi-class, as in every checkpoint before multi-label tasks
        spec["task"] = tasks.MULTILABEL
    spec["crop"] = PRESETS[cfg.augment].eval_crop  # inference sees what training saw on average
    spec["dicom_mapping"] = dicom.MAPPING  # how DICOM files became 8-bit: inference must apply the same
    return source, stores, spec, skipped


def build(cfg: TrainConfig, spec: dict, base: dict | None) -> nn.Module:
    model = models.build_model(spec["arch"], spec["num_classes"], spec["in_chans"], spec["stem"])
    if base is not None:
        models.load_backbone(model, base["state_dict"], spec["in_chans"], spec["stem"])
    elif cfg.weights == "imagenet":
        models.load_backbone(model, models.imagenet_state_dict(spec["arch"]), spec["in_chans"], spec["stem"])
    if cfg.finetune == "head":
        models.freeze_backbone(model)
    return model


def class_weights(labels: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=k).float().clamp(min=1)
    return counts.sum() / (k * counts)


def resolve_balance(cfg: TrainConfig, labels: torch.Tensor, k: int, facts: dict | None = None) -> str:
    """`--balance auto` by the plan's rule, on the plan's imbalance ratio when it measured one."""
    if cfg.balance != "auto":
        return cfg.balance
    ratio = (facts or {}).get("imbalance_ratio")
    if ratio is None and labels.ndim == 2:
        ratio = tasks.imbalance_ratio(labels.numpy())
    elif ratio is None:
        counts = torch.bincount(labels, minlength=k)
        present = counts[counts > 0].float()
        ratio = float(present.max() / present.min())
    return balance_for(ratio)


def epoch_order(n: int, labels: torch.Tensor, balance: str, k: int, generator: torch.Generator,
                chunk: int = 0) -> torch.Tensor:
    """This epoch's image order: a permutation, or a class-balanced sample with replacement.
    `chunk`: a store read from disk in chunks of that many images (`Store.chunk`) gets the same draw
    reordered to read each chunk once (`chunks.chunked_order`)."""
    if balance == "sample":
        w = class_weights(labels, k)[labels]
        order = torch.multinomial(w, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator)
    return chunked_order(order, chunk, generator) if chunk else order


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else (0.05 if cfg.optimizer == "sgd" else 1e-3)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    # fused kernels: one pass over all parameters instead of a Python loop per tensor (CPU and CUDA)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)


@torch.no_grad()
def update_ema(ema: torch.optim.swa_utils.AveragedModel, model: nn.Module) -> None:
    """`ema.update_parameters(model)` with its step counter left on the host: torch's own copies the counter to
    the model's device on every step, and a blocking copy to a GPU waits for all the work queued there."""
    groups: dict[torch.dtype, tuple[list, list]] = {}  # the average runs per dtype, as AveragedModel groups it
    for averaged, current in zip(itertools.chain(ema.module.parameters(), ema.module.buffers()),
                                 itertools.chain(model.parameters(), model.buffers())):
        pair = groups.setdefault(averaged.dtype, ([], []))
        pair[0].append(averaged.detach())
        pair[1].append(current.detach())
    first = int(ema.n_averaged) == 0  # a host tensor (never moved with the model): reading it waits for nothing
    for averaged, current in groups.values():
        if first:
            torch._foreach_copy_(averaged, current)
        else:
            ema.multi_avg_fn(averaged, current, ema.n_averaged)
    ema.n_averaged += 1


def train_one_epoch(model, store: Store, order: torch.Tensor, spec: dict, optimizer, scheduler, loss_fn,
                    cfg: TrainConfig, env: dict, generator: torch.Generator, ema=None, desc: str = "",
                    deadline: float | None = None, max_steps: int | None = None) -> float:
    """One pass over `order`, or its first `max_steps` batches when the schedule ends inside this epoch (cut short
    at `deadline`, a perf_counter time, as a last resort); returns the mean training loss."""
    model.train()
    preset = training_preset(cfg.augment, cfg.intensity)
    batches = order.split(cfg.batch_size)[:steps_per_epoch(len(order), cfg.batch_size)]
    if max_steps is not None:
        batches = batches[:max(0, max_steps)]
    # the loss is summed on the device: reading it back waits for the GPU, so that happens once per epoch
    # (and every PROGRESS_EVERY steps while a progress bar shows it), never once per step
    total, seen = torch.zeros((), dtype=runtime.accumulator_dtype(env["device"]), device=env["device"]), 0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not env["progress"])
    for step, idx in enumerate(bar, 1):
        if deadline is not None and seen and time.perf_counter() > deadline:
            break  # the time budget ends inside this epoch: validate what was trained so far
        x, y = batch_on_device(store, idx, env["device"])
        x = prepare_batch(x, spec["input_size"], spec["mean"], spec["std"], spec["in_chans"], preset, generator)
        if env["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(env["device"], env["precision"]):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        env["scaler"].scale(loss).backward()
        if cfg.grad_clip > 0:
            env["scaler"].unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        env["scaler"].step(optimizer)
        env["scaler"].update()
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()
        if ema is not None:
            update_ema(ema, model)
        total += loss.detach().to(total.dtype) * len(idx)
        seen += len(idx)
        if env["progress"] and step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{total.item() / seen:.4f}")
    return total.item() / max(1, seen)


def validation_row(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Multi-label labels (N×L): BCE loss, macro AUC, label accuracy at 0.5 (see metrics.multilabel_metrics)."""
    if not np.isfinite(probs).all():  # a diverged model: no metric is meaningful
        return {"val_loss": math.nan, "val_accuracy": math.nan, "val_balanced_accuracy": math.nan, "val_auc": math.nan,
                "val_f1_macro": math.nan}
    m = evaluate_predictions(labels, probs, classes)
    task = tasks.MULTILABEL if labels.ndim == 2 else tasks.MULTICLASS
    return {"val_loss": tasks.validation_loss(labels, probs, task), "val_accuracy": m["accuracy"],
            "val_balanced_accuracy": m["balanced_accuracy"], "val_auc": m["auc"], "val_f1_macro": m["f1_macro"]}


def monitor_score(row: dict, monitor: str) -> float:
    """Higher is better. AUC falls back to accuracy when undefined (one class in val); a diverged epoch never wins."""
    if not math.isfinite(row["val_loss"]):
        return -math.inf
    if monitor == "loss":
        return -row["val_loss"]
    value = row[f"val_{monitor}"]
    return row["val_accuracy"] if value is None or not math.isfinite(value) else value


def write_history(path: Path, history: list[dict]) -> None:
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def train(config: TrainConfig | dict | None = None, *, force: bool = False, resume: str | None = None,
          progress: bool = True, on_epoch: Callable[[int, dict], None] | None = None, **overrides: Any) -> dict:
    """Train a classifier; returns {"out", "metrics", "history"}. Same as `medclf train`.

    `on_epoch(epoch, row)`: called after each epoch's files are written, with its history row (cross-validation
    adds "fold"); an exception it raises ends training there (e.g. `medclf tune` pruning a trial)."""
    cfg, state, explicit = _resolve_config(config, resume, overrides)
    with distributed.joined(runtime.pick_device(cfg.device)) as world, distributed.quiet_unless_main(world), \
            _disk_full_is_one_line(resume or cfg.out or "runs"):
        return _train(cfg, state, explicit, force, resume, progress and world.is_main, world, on_epoch)


def preflight(config: TrainConfig | dict | str | None = None, *, resume: str | None = None, **overrides: Any) -> None:
    """The settings and DATA checked once before `--nproc N` starts N processes: a bad one is one line, not N."""
    cfg, _, _ = _resolve_config(config, resume, overrides)
    open_data(cfg)


@contextlib.contextmanager
def _disk_full_is_one_line(where: str):
    """A full disk anywhere (the run directory, the decoded-image cache) ends in one line, not a traceback."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not atomic.is_disk_full(exc):
            raise
        raise atomic.disk_full_error(getattr(exc, "filename", None) or where) from None


def _train(cfg: TrainConfig, state: dict | None, explicit: set[str], force: bool, resume: str | None,
           progress: bool, world: distributed.World = distributed.SOLO,
           on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    base = models.read_base(cfg.weights) if cfg.weights not in ("none", "imagenet") else None
    source, the_plan = None, None
    if cfg.plan and not resume and not set(PLANNED) <= explicit:
        if world.is_main:  # one plan (one timing probe) for every rank
            source = open_data(cfg)
            the_plan = apply_plan(cfg, source, base, explicit, progress, world.size)
        the_plan = _share_plan(cfg, the_plan, world)
    facts = the_plan["fingerprint"] if the_plan is not None else None
    _check_world(cfg, world, resume)
    if cfg.refit and cfg.folds < 2:
        raise MedclfError("--refit retrains on everything after cross-validation: it needs --folds K (K >= 2)")
    runtime.seed_everything(cfg.seed)
    with _disk_full_is_one_line(cache_root(cfg.cache_dir)):  # rank 0 decodes into the cache, the others read it
        source, stores, spec, skipped = distributed.main_first(world, lambda: load_data(cfg, base, source, facts))
    checked = None if resume or not world.is_main else brief_doctor(source, str(cfg.data), progress, stores)
    spec["weights"] = "none" if base is None and cfg.weights != "imagenet" else cfg.weights
    device = distributed.rank_device(runtime.pick_device(cfg.device), world)
    precision = runtime.pick_precision(cfg.precision, device)
    channels_last = runtime.use_channels_last(cfg.channels_last, device, precision)
    runtime.tune_backend(device)
    balance = resolve_balance(cfg, stores["train"].labels, spec["num_classes"], facts)
    tasks.check_balance(tasks.task_of(spec), balance)
    if cfg.folds >= 2 and tasks.is_multilabel(spec):
        raise MedclfError(f"--folds {cfg.folds}: cross-validation folds are stratified by class, which a multi-label "
                          "task lacks; train one model (--folds 0) on a validation split")
    build(cfg, spec, base)  # the model is built once before any file is written: a base that does not fit fails here
    split_files = ({s: st.ids for s, st in stores.items()}, {s: st.labels.numpy() for s, st in stores.items()},
                   source.classes, {s: sources.groups_of(source, st.ids) for s, st in stores.items()})
    # everything above validates the settings and the data: only now is the run directory made (or checked)
    if resume:
        out = Path(resume)
        rundir.check_same_splits(out, *split_files)
        if world.is_main:
            rundir.remove_temporaries(out)
    else:
        out = distributed.from_main(world, lambda: rundir.prepare_run_dir(cfg.out, source.name, source.root, force))
    cfg.out = str(out)
    cfg.world_size, cfg.backend = world.size, world.backend
    resolved = {**cfg.to_dict(), "size": spec["input_size"], "channels": spec["in_chans"], "stem": spec["stem"],
                "model": spec["arch"], "balance": balance, "device": str(device), "precision": precision,
                "channels_last": channels_last}
    env = {"device": device, "precision": precision, "channels_last": channels_last, "progress": progress,
           "balance": balance, "world": world, "on_epoch": on_epoch}
    # train and val are read every epoch; cross-validation also holds them pooled and one fold's two parts
    stores, placement = place_stores(stores, ("train", "val"), device, copies=3 if cfg.folds >= 2 else 1)
    if device.type == "cuda":
        print(f"medclf: {placement.reason}")
    if cfg.folds >= 2:
        if not resume:
            _write_run_files(out, resolved, the_plan, split_files, skipped, checked)
        return crossval.train_folds(cfg, source, stores, spec, base, env, out, resolved)
    if not resume and world.is_main:
        _write_run_files(out, resolved, the_plan, split_files, skipped, checked)
    print(f"medclf: {len(stores['train'])} train / {len(stores['val'])} val images, {spec['num_classes']} classes, "
          f"{spec['arch']} ({spec['stem']} stem, {spec['input_size']} px, {spec['in_chans']} ch) on "
          f"{runtime.describe(device, precision, channels_last)}{distributed.describe(world)} → {out}")
    fitted = fit(cfg, spec, base, stores["train"], stores["val"], out, env, state, resolved)
    if world.is_main and not (out / "model.pt").is_file():
        raise MedclfError(f"training produced no usable checkpoint in {out}: the validation loss was not finite in any "
                          f"of {len(fitted['history'])} epoch(s) {DIVERGED}")
    # rank 0 evaluates and writes the run's files; the others wait for its metrics
    metrics = distributed.from_main(world, lambda: finish_run(out, stores, spec, cfg, device, precision, channels_last,
                                                                kept=fitted["kept"]))
    return {"out": str(out), "metrics": metrics, "history": fitted["history"]}


def _check_world(cfg: TrainConfig, world: distributed.World, resume: str | None) -> None:
    """What many processes cannot do: resume a run made by another number of them (each epoch's steps and
    shards depend on it), or cross-validate (its K models train one after another in one process)."""
    if resume and cfg.world_size != world.size:
        raise MedclfError(f"cannot resume {resume}: it was trained by {cfg.world_size} process(es), this is "
                          f"{world.size}; resume it with as many (torchrun --nproc_per_node or --nproc "
                          f"{cfg.world_size})")
    if world.active and cfg.folds >= 2:
        raise MedclfError(f"--folds {cfg.folds}: cross-validation trains its models one after another in one "
                          f"process; with {world.size} processes train one model (--folds 0)")


def _share_plan(cfg: TrainConfig, the_plan: dict | None, world: distributed.World) -> dict | None:
    """Rank 0's plan, and the settings it chose, on every rank."""
    the_plan, settings = distributed.main_value(world, (the_plan, cfg.to_dict()))
    for name, value in settings.items():
        setattr(cfg, name, value)
    return the_plan


def fit(cfg: TrainConfig, spec: dict, base: dict | None, train_store: Store, val_store: Store | None, out: Path,
        env: dict, state: dict | None, resolved: dict, desc: str = "", resume_dir: Path | None = None) -> dict:
    """Train one model on `train_store`, validating on `val_store` (None: no validation, e.g. a refit on all data)
    after each epoch; writes out/model.pt, last.pt and history.csv. Returns {"history", "stop_reason", "kept"}.

    The schedule always completes: early stopping, saturated validation and the time budget bring its end
    forward (it anneals to 0 over a short tail) instead of stopping at a high learning rate.
    `cfg.checkpoint`: "final" keeps the weights (EMA when on) of the last epoch, "best" those of the best
    validation epoch (the plan chooses best only where validation is large enough to rank epochs) unless
    validation saturates: then the final weights (see _kept)."""
    device, precision, channels_last = env["device"], env["precision"], env["channels_last"]
    k = spec["num_classes"]
    gen = runtime.seed_everything(cfg.seed)
    world = env.get("world", distributed.SOLO)
    model = build(cfg, spec, base).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    train_model = distributed.wrap(model, world, device)
    model = getattr(train_model, "module", model)  # SyncBatchNorm layers (CUDA ranks) replace the built ones
    train_model = torch.compile(train_model) if cfg.compile else train_model
    optimizer = make_optimizer(cfg, model)
    steps = steps_per_epoch(distributed.shard_length(len(train_store), world), cfg.batch_size)
    scheduler = make_scheduler(cfg, optimizer, steps)
    sched = schedule_of(scheduler)
    finishable = sched is not None and sched.kind == "cosine"  # a constant rate is the user's choice: it just stops
    loss_fn = tasks.loss_function(tasks.task_of(spec), train_store.labels, env["balance"], cfg.label_smoothing,
                                  lambda labels: class_weights(labels, k)).to(device)
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
                                                  use_buffers=True)
    env = {**env, "scaler": torch.amp.GradScaler(device.type, enabled=precision == "fp16")}
    history, best, start_epoch = [], -math.inf, 0
    if state is not None:
        history, best, start_epoch = _restore(state, model, ema, optimizer, scheduler, env["scaler"], gen, out)
        if world.is_main:  # last.pt is the record: a kill after it was saved left history.csv an epoch behind
            write_history(out / "history.csv", history)
    started = time.perf_counter() - (state or {}).get("elapsed", 0.0)  # the time budget's clock, continued on resume
    deadline = started + cfg.time_budget * 60 if cfg.time_budget else None
    bad_epochs = _epochs_since_best(history, cfg.monitor) if val_store is not None else 0
    stop_reason = (state or {}).get("stop_reason") or "completed"
    keep_best = cfg.checkpoint == "best" and val_store is not None  # without validation there is no best epoch
    n_val = len(val_store) if val_store is not None else 0
    least_steps = min_epochs(len(train_store)) * steps  # saturation does not end training sooner than this
    epochs = tqdm(range(start_epoch, cfg.epochs), desc=f"{desc}epochs".strip(), unit="epoch", initial=start_epoch,
                  total=cfg.epochs, disable=not env["progress"])
    try:
        for epoch in epochs:
            if (state or {}).get("finished") or sched is not None and sched.done(scheduler.last_epoch):
                break  # resumed after training had ended: nothing left to train
            t0 = time.perf_counter()
            # every rank draws the same order (one seeded generator) and trains on its shard of it
            order = epoch_order(len(train_store), train_store.labels, env["balance"], k, gen, train_store.chunk)
            order = distributed.shard(order, world)
            left = sched.last_step + 1 - scheduler.last_epoch if sched is not None else None
            train_loss = train_one_epoch(train_model, train_store, order, spec, optimizer, scheduler, loss_fn, cfg,
                                         env, gen, ema, desc=f"{desc}epoch {epoch + 1}",
                                         deadline=None if world.active else deadline,  # ranks take equal steps
                                         max_steps=left)
            train_loss = distributed.mean(world, train_loss)
            scored = ema.module if ema is not None else model
            row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}
            if val_store is not None:
                probs = distributed.predict_all(world, scored, val_store, lambda net, part: predict_store(
                    net, part, spec, device, precision, channels_last))
                row.update(validation_row(probs, val_store.labels.numpy(), spec["classes"]))
            now = time.perf_counter()
            row["seconds"] = now - t0
            if world.active:  # rank 0's clock decides for every rank when the time budget ends training
                time_left = None if deadline is None else deadline - now
                row["seconds"], time_left = distributed.main_value(world, (row["seconds"], time_left))
                deadline = None if time_left is None else now + time_left
            history.append(row)
            score = monitor_score(row, cfg.monitor) if val_store is not None else math.inf
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(score)
            extra = {"config": resolved, "epoch": epoch + 1, "val": {k2: v for k2, v in row.items() if k2.startswith("val_")}}
            improved = score > best
            best, bad_epochs = (score, 0) if improved else (best, bad_epochs + 1)
            done = sched is not None and sched.done(scheduler.last_epoch)
            if not done:
                taken = scheduler.last_epoch if sched is not None else (epoch + 1) * steps  # optimizer steps so far
                ending = _early_end(cfg, history, bad_epochs, n_val, deadline, epoch, steps, sched, taken, finishable,
                                    now=now if world.active else None, least_steps=least_steps)
                if ending is not None:
                    stop_reason, done = ending
                    if sched is not None:  # the next step's rate follows the new end at once
                        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
                            group["lr"] = base_lr * sched(taken)
            if world.is_main and (improved if _kept(keep_best, stop_reason) == "best"
                                  else math.isfinite(row.get("val_loss", 0.0))):
                atomic.torch_save(models.checkpoint_dict(scored, spec, extra), out / "model.pt")
            if world.is_main:
                _save_last(out, model, ema, spec, extra, optimizer, scheduler, env["scaler"],
                           {"history": history, "best": best, "epoch": epoch + 1, "generator": gen.get_state(),
                            "elapsed": time.perf_counter() - started, "stop_reason": stop_reason, "finished": done})
                write_history(out / "history.csv", history)
            if env.get("on_epoch") is not None:  # after the epoch's files: what it stops leaves a consistent run
                env["on_epoch"](epoch + 1, dict(row))
            epochs.set_postfix(loss=f"{train_loss:.4f}", **{f"val_{cfg.monitor}": f"{row.get(f'val_{cfg.monitor}', 0) or 0:.4f}"})
            if done or distributed.main_value(world, deadline is not None and time.perf_counter() > deadline):
                break
    except KeyboardInterrupt:
        epochs.close()
        raise KeyboardInterrupt(_interrupted_message(resume_dir or out, out, world.size)) from None
    epochs.close()
    kept = _kept(keep_best, stop_reason)
    print(f"{desc}{stop_reason}: {len(history)} epoch(s), {scheduler.last_epoch if sched else '?'} steps, "
          f"{time.perf_counter() - started:.0f} s; kept the {'best epoch' if kept == 'best' else 'final'} weights")
    return {"history": history, "stop_reason": stop_reason, "kept": kept}


def _kept(keep_best: bool, stop_reason: str) -> str:
    """Which weights model.pt holds: "best" (validation's best epoch) or "final". Once validation is saturated,
    epochs differ by a few images: ranking them would choose noise (with label smoothing, calibration rather
    than accuracy), so a run that ends saturated keeps its last, annealed weights."""
    return "best" if keep_best and not stop_reason.startswith(SATURATED) else "final"


def _early_end(cfg: TrainConfig, history: list[dict], bad_epochs: int, n_val: int, deadline: float | None,
               epoch: int, steps: int, sched, taken: int, finishable: bool, now: float | None = None,
               least_steps: int = 0) -> tuple[str, bool] | None:
    """Whether training ends before its planned epochs: (why, stop now). A finishable (cosine) schedule does not
    stop at once: its end is brought forward to a short annealing tail, and training stops when that has run.
    `now`: the moment the time left is counted from (rank 0's reading under torchrun), else the clock's now.
    `least_steps`: saturated validation ends training no sooner (the plan's min_epochs: a validation split
    that is right early, during warm-up, does not make a model that has seen too few images converged)."""
    reason, last = None, None
    tail = tail_steps(sched.total if sched else cfg.epochs * steps, steps)
    if cfg.patience and bad_epochs >= cfg.patience:
        reason, last = f"early stop: no {cfg.monitor} gain in {cfg.patience} epochs", taken + tail - 1
    elif cfg.stop_saturated and saturated(history, n_val):
        wrong = round((1 - history[-1]["val_accuracy"]) * n_val)
        reason, last = f"{SATURATED} ({wrong} error(s) on {n_val} images)", max(taken + tail, least_steps) - 1
    if deadline is not None:
        fit_more = epochs_that_fit(deadline - (time.perf_counter() if now is None else now),
                                   [r["seconds"] for r in history])
        planned_last = sched.last_step if sched else (cfg.epochs - epoch - 1) * steps + taken - 1
        budget_last = taken + fit_more * steps - 1
        if budget_last < planned_last and (last is None or budget_last < last):
            reason, last = f"time budget of {cfg.time_budget:g} min", budget_last
    if reason is None or (finishable and last >= sched.last_step):
        return None  # nothing ends sooner than already planned
    if not finishable and reason.startswith("time budget") and last >= taken:
        return None  # a rate that cannot anneal: run on while whole epochs still fit
    if not finishable or last < taken:
        return reason, True
    sched.finish_at(taken, last)
    return f"{reason}; schedule finished over {sched.last_step + 1 - taken} more step(s)", False


def brief_doctor(source: sources.Source, data: str, progress: bool, stores: dict[str, Store] | None = None) -> dict:
    """`medclf doctor`'s cheap checks (exact duplicates across splits, patients in two splits): warnings only.
    The files' content hashes come from `stores` when their decode took them (no file is read twice)."""
    from .doctor import brief, store_hashes, warn  # the module, not the medclf.doctor function of the same name

    checked = brief(source, progress, store_hashes(source, stores or {}))
    warn(checked, data=data)
    return checked


def _write_run_files(out: Path, resolved: dict, the_plan: dict | None, split_files: tuple, skipped: list[str],
                     checked: dict | None = None) -> None:
    save_yaml(resolved, out / "config.yaml")
    if checked is not None:
        atomic.write_text(out / "doctor.json", json.dumps(checked, indent=2))
    if the_plan is not None:
        save_plan(the_plan, out / "plan.yaml")
        atomic.write_text(out / "fingerprint.json", json.dumps(plain(the_plan["fingerprint"]), indent=2))
    atomic.write_with(out / "splits.csv", lambda tmp: splits.write_split_file(tmp, *split_files))
    if skipped:
        atomic.write_text(out / "skipped.txt", "\n".join(skipped) + "\n")
        print(f"skipped {len(skipped)} unreadable image(s); listed in {out / 'skipped.txt'}")


def read_fold_state(folder: Path) -> dict | None:
    """A fold's (or refit's) last.pt to continue from, None when it never finished an epoch."""
    return models.read_resume_state(folder / "last.pt") if (folder / "last.pt").is_file() else None


def _interrupted_message(out: Path, saved_in: Path | None = None, nproc: int = 1) -> str:
    if ((saved_in or out) / "last.pt").is_file() or rundir.resumable(out):
        return (f"the last finished epoch is saved: resume with `medclf train --resume {out}"
                f"{f' --nproc {nproc}' if nproc > 1 else ''}`")
    return f"no epoch finished, so there is nothing to resume; the same command starts over (it replaces {out})"


def finish_run(out: Path, stores: dict[str, Store], spec: dict, cfg: TrainConfig, device, precision, channels_last,
               kept: str) -> dict:
    """Evaluate the kept checkpoint on val (choosing the binary threshold and giving the estimate) and test;
    write metrics and plots. `kept`: which weights fit kept ("best" or "final")."""
    model, ckpt = models.load_model(out / "model.pt")
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    results, curves = {}, {}
    threshold = None
    for name in ("val", "test"):
        if name not in stores:
            continue
        probs = predict_store(model, stores[name], spec, device, precision, channels_last, tta=cfg.tta, desc=name)
        labels = stores[name].labels.numpy()
        if name == "val":
            threshold = choose_threshold(labels, probs)  # multi-label: a list, one per label
        results[name] = evaluate_predictions(labels, probs, spec["classes"], threshold)
        results[name]["tta"] = cfg.tta
        results[name].update(headline_intervals(labels, probs, spec["classes"], threshold))  # the card quotes them
        curves[name] = (labels, probs)
    if threshold is not None:  # predict/evaluate reuse the validation threshold(s)
        ckpt["thresholds" if tasks.is_multilabel(spec) else "threshold"] = threshold
        atomic.torch_save(ckpt, out / "model.pt")
    if "val" in curves and len(curves["val"][0]):
        method = METHOD_VAL if kept == "final" else METHOD_VAL_SELECTED
        results["estimate"] = estimate(*curves["val"], spec["classes"], method, cis=results["val"]["ci95"])
    results = json_safe(results)
    atomic.write_text(out / "metrics.json", json.dumps(results, indent=2))
    summary = ", ".join(f"{s} acc {r['accuracy']:.4f} auc {r['auc'] if r['auc'] is None else round(r['auc'], 4)}"
                        for s, r in results.items() if s in ("val", "test"))
    print(f"{summary} → {out}")
    from .reporting import run_report  # matplotlib: imported once training is done

    run_report.write_run_outputs(out, results, curves, spec["classes"], stores, str(device))
    return results


def _save_last(out: Path, model, ema, spec: dict, extra: dict, optimizer, scheduler, scaler, progress: dict) -> None:
    """last.pt: everything --resume needs to continue exactly where this epoch ended (weights, optimizer,
    schedule, loss scaler, every random stream, the history and the time budget spent)."""
    state = models.checkpoint_dict(model, spec, extra)
    state.update({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict(), "rng": runtime.rng_state(), **progress})
    if ema is not None:
        state["ema"] = ema.state_dict()
    atomic.torch_save(state, out / "last.pt")


def _restore(state: dict, model, ema, optimizer, scheduler, scaler, gen: torch.Generator, run: Path
             ) -> tuple[list, float, int]:
    """Load last.pt into the freshly built objects; returns history, best score and the epochs done.

    last.pt passed the resume schema; what PyTorch's loaders still refuse (a state from other settings
    or a damaged file) is a problem with that file, so it is one line naming it."""
    try:
        return _load_state(state, model, ema, optimizer, scheduler, scaler, gen)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise MedclfError(f"cannot resume {run}: last.pt does not fit this run ({type(exc).__name__}: {first})") from None


def _load_state(state: dict, model, ema, optimizer, scheduler, scaler, gen: torch.Generator) -> tuple[list, float, int]:
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    gen.set_state(state["generator"])
    if "rng" in state:
        runtime.restore_rng_state(state["rng"])
    return state["history"], state["best"], state["epoch"]


def _epochs_since_best(history: list[dict], monitor: str) -> int:
    history = [r for r in history if "val_loss" in r]  # a refit has no validation rows
    if not history:
        return 0
    scores = [monitor_score(r, monitor) for r in history]
    return len(scores) - 1 - int(np.argmax(scores))


def apply_plan(cfg: TrainConfig, source: sources.Source, base: dict | None, explicit: set[str],
               verbose: bool = True, world_size: int = 1) -> dict:
    """Fill every planned setting the user did not set from the data's plan; returns the plan."""
    fp = fingerprint(source)
    fixed = {name: getattr(cfg, name) for name in PLANNED if name in explicit}
    if cfg.channels is not None:
        fixed["channels"] = cfg.channels
    if cfg.weights not in ("none", None):
        fixed["weights"] = cfg.weights
    if cfg.refit:
        fixed["refit"] = True
    # a budget no one gave is the plan's choice (the data's own, such as the demo's short one, or the default)
    result = make_plan(fp, cfg.time_budget if "time_budget" in explicit else None, base, fixed, cfg.device,
                       world_size=world_size)
    result["fingerprint"] = fp
    for name, value in result["settings"].items():
        if name not in explicit:
            setattr(cfg, name, value)
    cfg.validate()
    if verbose:
        print("plan (flags you pass override it):\n" + format_plan(result, fp))
    return result


def _resolve_config(config, resume: str | None, overrides: dict) -> tuple[TrainConfig, dict | None, set[str]]:
    """The config, the resume state, and the names of the settings given explicitly (the plan fills the rest)."""
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    state = None
    if resume:
        run = Path(resume)
        folds_run = (run / "config.yaml").is_file() and (load_yaml(run / "config.yaml").get("folds") or 0) >= 2
        if not folds_run and not (run / "last.pt").is_file():
            raise MedclfError(f"cannot resume {run}: no last.pt there")
        values.update(load_yaml(run / "config.yaml"))
        state = None if folds_run else models.read_resume_state(run / "last.pt")  # folds: each fold has its own
        # the resolved config names the picked device/precision; re-pick them on this machine
        values.update({"device": "auto", "precision": "auto", "channels_last": None})
        explicit |= set(values)
    if isinstance(config, TrainConfig):  # a dataclass cannot tell "left at default" from "set": non-defaults count
        defaults = TrainConfig().to_dict()
        values.update(config.to_dict())
        explicit |= {k for k, v in config.to_dict().items() if v != defaults[k]}
    elif isinstance(config, (str, Path)):
        loaded = load_yaml(config)
        loaded.pop("out", None)  # a re-run gets a run directory of its own unless --out says otherwise
        values.update(loaded)
        explicit |= set(loaded)
    elif isinstance(config, dict):
        values.update(config)
        explicit |= set(config)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    explicit |= set(given)
    cfg = TrainConfig.from_dict(values).validate()
    if not cfg.data:
        raise MedclfError("no DATA given")
    return cfg, state, explicit
