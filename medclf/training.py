"""The training loop: load data, build the model, train epoch by epoch, keep the best, evaluate."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import atomic, models, rundir, runtime
from .planning import PLANNED, balance_for, fingerprint, format_plan, make_plan, save_plan, steps_per_epoch
from .config import TrainConfig, load_yaml, save_yaml
from .data import sources, splits
from .data.augment import PRESETS, prepare_batch, training_preset
from .data.store import Store, build_store, cache_root, native_size, probe_channels
from .errors import MedclfError
from .evaluation import choose_threshold
from .inference import predict_store
from .metrics import evaluate_predictions
from .serialize import json_safe, plain

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc",
                   "val_f1_macro", "lr", "seconds"]


def open_data(cfg: TrainConfig) -> sources.Source:
    """DATA's splits, with a validation split carved out of train when it has none."""
    source = sources.open_source(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
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
    spec["crop"] = PRESETS[cfg.augment].eval_crop  # inference sees what training saw on average
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
    if ratio is None:
        counts = torch.bincount(labels, minlength=k)
        present = counts[counts > 0].float()
        ratio = float(present.max() / present.min())
    return balance_for(ratio)


def epoch_order(n: int, labels: torch.Tensor, balance: str, k: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's image order: a permutation, or a class-balanced sample with replacement."""
    if balance == "sample":
        w = class_weights(labels, k)[labels]
        return torch.multinomial(w, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", clock: float = 0.0) -> float:
    """The learning rate at optimizer step `step` (0-based) of `total`, as a fraction of the peak: linear
    warm-up over `warmup` steps, then constant or a cosine that reaches 0 exactly on the last step.

    `clock` (the fraction of the time budget spent) moves the cosine ahead of the step count when the clock,
    not the steps, will end training, so the rate has decayed when the budget stops a slower-than-probed run.
    It counts in whole steps, so a budget that is far from binding leaves the schedule exactly as planned.
    """
    assert total >= 1 and 0 <= warmup < max(total, 1) and step >= 0 and clock >= 0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = total - warmup - 1  # the last step has decayed fully
    done = max(step - warmup, round(clock * decay_steps))
    progress = min(1.0, done / decay_steps) if decay_steps > 0 else 0.0
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int,
                   budget_used: Callable[[], float] | None = None):
    """`lr_factor` per optimizer step (`steps` per epoch, from `steps_per_epoch`), or the plateau rule per epoch."""
    if cfg.schedule == "plateau":  # fed monitor_score, which is higher-is-better for every monitor (loss negated)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                          patience=max(1, cfg.patience // 2))
    total = cfg.epochs * steps
    warmup = min(int(cfg.warmup_epochs * steps), total // 2)

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup, cfg.schedule, budget_used() if budget_used is not None else 0.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def train_one_epoch(model, store: Store, order: torch.Tensor, spec: dict, optimizer, scheduler, loss_fn,
                    cfg: TrainConfig, env: dict, generator: torch.Generator, ema=None, desc: str = "",
                    deadline: float | None = None) -> float:
    """One pass over `order` (cut short at `deadline`, a perf_counter time); returns the mean training loss."""
    model.train()
    preset = training_preset(cfg.augment, cfg.intensity)
    batches = order.split(cfg.batch_size)[:steps_per_epoch(len(order), cfg.batch_size)]
    total, seen = 0.0, 0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not env["progress"])
    for idx in bar:
        if deadline is not None and seen and time.perf_counter() > deadline:
            break  # the time budget ends inside this epoch: validate what was trained so far
        x = store.take(idx).to(env["device"], non_blocking=True)
        y = store.labels[idx].to(env["device"], non_blocking=True)
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
            ema.update_parameters(model)
        total += loss.item() * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(1, seen)


def validation_row(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float]:
    if not np.isfinite(probs).all():  # a diverged model: no metric is meaningful
        return {"val_loss": math.nan, "val_accuracy": math.nan, "val_balanced_accuracy": math.nan, "val_auc": math.nan,
                "val_f1_macro": math.nan}
    m = evaluate_predictions(labels, probs, classes)
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return {"val_loss": float(-np.log(p).mean()), "val_accuracy": m["accuracy"],
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
          progress: bool = True, **overrides: Any) -> dict:
    """Train a classifier; returns {"out", "metrics", "history"}. Same as `medclf train`."""
    cfg, state, explicit = _resolve_config(config, resume, overrides)
    with _disk_full_is_one_line(resume or cfg.out or "runs"):
        return _train(cfg, state, explicit, force, resume, progress)


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
           progress: bool) -> dict:
    base = models.read_checkpoint(cfg.weights) if cfg.weights not in ("none", "imagenet") else None
    source, the_plan = None, None
    if cfg.plan and not resume and not set(PLANNED) <= explicit:
        source = open_data(cfg)
        the_plan = apply_plan(cfg, source, base, explicit, progress)
    facts = the_plan["fingerprint"] if the_plan is not None else None
    gen = runtime.seed_everything(cfg.seed)
    with _disk_full_is_one_line(cache_root(cfg.cache_dir)):
        source, stores, spec, skipped = load_data(cfg, base, source, facts)
    spec["weights"] = "none" if base is None and cfg.weights != "imagenet" else cfg.weights
    device = runtime.pick_device(cfg.device)
    precision = runtime.pick_precision(cfg.precision, device)
    channels_last = runtime.use_channels_last(cfg.channels_last, device, precision)
    k = spec["num_classes"]
    train_store, val_store = stores["train"], stores["val"]
    balance = resolve_balance(cfg, train_store.labels, k, facts)
    model = build(cfg, spec, base).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(cfg, model)
    split_files = ({s: st.ids for s, st in stores.items()}, {s: st.labels.numpy() for s, st in stores.items()},
                   source.classes)
    # everything above validates the settings and the data: only now is the run directory made (or checked)
    if resume:
        out = Path(resume)
        rundir.check_same_splits(out, *split_files)
        rundir.remove_temporaries(out)
    else:
        out = rundir.prepare_run_dir(cfg.out, source.name, source.root, force)
    cfg.out = str(out)
    resolved = {**cfg.to_dict(), "size": spec["input_size"], "channels": spec["in_chans"], "stem": spec["stem"],
                "model": spec["arch"], "balance": balance, "device": str(device), "precision": precision,
                "channels_last": channels_last}
    if not resume:
        _write_run_files(out, resolved, the_plan, split_files, skipped)

    steps = steps_per_epoch(len(train_store), cfg.batch_size)
    started = time.perf_counter() - (state or {}).get("elapsed", 0.0)  # the time budget's clock, continued on resume
    budget_used = (lambda: (time.perf_counter() - started) / (cfg.time_budget * 60)) if cfg.time_budget else None
    scheduler = make_scheduler(cfg, optimizer, steps, budget_used)
    weight = class_weights(train_store.labels, k).to(device) if balance == "weight" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
                                                  use_buffers=True)
    env = {"device": device, "precision": precision, "channels_last": channels_last, "progress": progress,
           "scaler": torch.amp.GradScaler(device.type, enabled=precision == "fp16")}
    history, best, start_epoch = [], -math.inf, 0
    if state is not None:
        history, best, start_epoch = _restore(state, model, ema, optimizer, scheduler, env["scaler"], gen, out)
    print(f"medclf: {len(train_store)} train / {len(val_store)} val images, {k} classes, {spec['arch']} "
          f"({spec['stem']} stem, {spec['input_size']} px, {spec['in_chans']} ch) on "
          f"{runtime.describe(device, precision, channels_last)} → {out}")

    bad_epochs = _epochs_since_best(history, cfg.monitor)
    deadline = started + cfg.time_budget * 60 if cfg.time_budget else None
    epochs = tqdm(range(start_epoch, cfg.epochs), desc="epochs", unit="epoch", initial=start_epoch, total=cfg.epochs,
                  disable=not progress)
    stop_reason = "completed"
    try:
        for epoch in epochs:
            t0 = time.perf_counter()
            order = epoch_order(len(train_store), train_store.labels, balance, k, gen)
            train_loss = train_one_epoch(train_model, train_store, order, spec, optimizer, scheduler, loss_fn, cfg,
                                         env, gen, ema, desc=f"epoch {epoch + 1}", deadline=deadline)
            scored = ema.module if ema is not None else model
            probs = predict_store(scored, val_store, spec, device, precision, channels_last)
            row = {"epoch": epoch + 1, "train_loss": train_loss, **validation_row(probs, val_store.labels.numpy(), spec["classes"]),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            history.append(row)
            score = monitor_score(row, cfg.monitor)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(score)
            extra = {"config": resolved, "epoch": epoch + 1, "val": {k2: v for k2, v in row.items() if k2.startswith("val_")}}
            if score > best:
                best, bad_epochs = score, 0
                atomic.torch_save(models.checkpoint_dict(scored, spec, extra), out / "model.pt")
            else:
                bad_epochs += 1
            _save_last(out, model, ema, spec, extra, optimizer, scheduler, env["scaler"],
                       {"history": history, "best": best, "epoch": epoch + 1, "generator": gen.get_state(),
                        "elapsed": time.perf_counter() - started})
            write_history(out / "history.csv", history)
            epochs.set_postfix(loss=f"{train_loss:.4f}", **{f"val_{cfg.monitor}": f"{row.get(f'val_{cfg.monitor}', 0) or 0:.4f}"})
            if cfg.patience and bad_epochs >= cfg.patience:
                stop_reason = f"early stop: no {cfg.monitor} gain in {cfg.patience} epochs"
                break
            elapsed = time.perf_counter() - started
            if cfg.time_budget and (elapsed + elapsed / (epoch + 1) > cfg.time_budget * 60
                                    or time.perf_counter() > deadline):
                stop_reason = f"time budget of {cfg.time_budget:g} min reached"
                break
    except KeyboardInterrupt:
        epochs.close()
        raise KeyboardInterrupt(_interrupted_message(out)) from None
    epochs.close()
    print(f"{stop_reason} after {len(history)} epoch(s), {time.perf_counter() - started:.0f} s")
    if not (out / "model.pt").is_file():
        raise MedclfError(f"training produced no usable checkpoint in {out}: the validation loss was not finite in any "
                          f"of {len(history)} epoch(s) (the model diverged); try a lower --lr")
    metrics = finish_run(out, stores, spec, cfg, device, precision, channels_last)
    return {"out": str(out), "metrics": metrics, "history": history}


def _write_run_files(out: Path, resolved: dict, the_plan: dict | None, split_files: tuple, skipped: list[str]) -> None:
    save_yaml(resolved, out / "config.yaml")
    if the_plan is not None:
        save_plan(the_plan, out / "plan.yaml")
        atomic.write_text(out / "fingerprint.json", json.dumps(plain(the_plan["fingerprint"]), indent=2))
    atomic.write_with(out / "splits.csv", lambda tmp: splits.write_split_file(tmp, *split_files))
    if skipped:
        atomic.write_text(out / "skipped.txt", "\n".join(skipped) + "\n")
        print(f"skipped {len(skipped)} unreadable image(s); listed in {out / 'skipped.txt'}")


def _interrupted_message(out: Path) -> str:
    if (out / "last.pt").is_file():
        return f"the last finished epoch is saved: resume with `medclf train --resume {out}`"
    return f"no epoch finished, so there is nothing to resume; the same command starts over (it replaces {out})"


def finish_run(out: Path, stores: dict[str, Store], spec: dict, cfg: TrainConfig, device, precision, channels_last) -> dict:
    """Evaluate the best checkpoint on val (choosing the binary threshold) and test; write metrics and plots."""
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
            threshold = choose_threshold(labels, probs)
        results[name] = evaluate_predictions(labels, probs, spec["classes"], threshold)
        results[name]["tta"] = cfg.tta
        curves[name] = (labels, probs)
    if threshold is not None:  # predict/evaluate reuse the validation threshold
        ckpt["threshold"] = threshold
        atomic.torch_save(ckpt, out / "model.pt")
    results = json_safe(results)
    atomic.write_text(out / "metrics.json", json.dumps(results, indent=2))
    summary = ", ".join(f"{s} acc {r['accuracy']:.4f} auc {r['auc'] if r['auc'] is None else round(r['auc'], 4)}"
                        for s, r in results.items())
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
    if not history:
        return 0
    scores = [monitor_score(r, monitor) for r in history]
    return len(scores) - 1 - int(np.argmax(scores))


def apply_plan(cfg: TrainConfig, source: sources.Source, base: dict | None, explicit: set[str],
               verbose: bool = True) -> dict:
    """Fill every planned setting the user did not set from the data's plan; returns the plan."""
    fp = fingerprint(source)
    fixed = {name: getattr(cfg, name) for name in PLANNED if name in explicit}
    if cfg.channels is not None:
        fixed["channels"] = cfg.channels
    if cfg.weights not in ("none", None):
        fixed["weights"] = cfg.weights
    result = make_plan(fp, cfg.time_budget, base, fixed, cfg.device)
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
        if not (run / "last.pt").is_file():
            raise MedclfError(f"cannot resume {run}: no last.pt there")
        values.update(load_yaml(run / "config.yaml"))
        state = models.read_resume_state(run / "last.pt")
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
