"""The training loop: load data, build the model, train epoch by epoch, keep the best, evaluate."""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import models, runtime
from .plan import PLANNED, fingerprint, format_plan, make_plan, plain, save_plan
from .config import TrainConfig, load_yaml, save_yaml
from .data import sources, splits
from .data.augment import PRESETS, prepare_batch
from .data.store import Store, build_store, native_size, probe_channels
from .errors import MedclfError
from .evaluate import choose_threshold
from .inference import predict_store
from .metrics import evaluate_predictions, json_safe

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc",
                   "val_f1_macro", "lr", "seconds"]


def open_data(cfg: TrainConfig) -> sources.Source:
    """DATA's splits, with a validation split carved out of train when it has none."""
    source = sources.open_source(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    if "train" not in source.splits:
        raise MedclfError(f"{cfg.data} has no train split")
    sources.ensure_val_split(source, cfg.val_fraction, cfg.seed)
    return source


def load_data(cfg: TrainConfig, base: dict | None, source: sources.Source | None = None
              ) -> tuple[sources.Source, dict[str, Store], dict[str, Any], list[str]]:
    """Open DATA, fix input size and channels, decode every split once. Returns source, stores, spec, skipped files."""
    return _load_stores(cfg, base, source if source is not None else open_data(cfg))


def _load_stores(cfg: TrainConfig, base: dict | None, source: sources.Source):
    if base:  # fine-tuning a medclf model: inherit its preprocessing
        input_size, channels, stem = base["input_size"], base["in_chans"], base["stem"]
    else:
        input_size = cfg.size or native_size(source)
        channels = cfg.channels or probe_channels(source, source.splits["train"])
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


def resolve_balance(cfg: TrainConfig, labels: torch.Tensor, k: int) -> str:
    if cfg.balance != "auto":
        return cfg.balance
    counts = torch.bincount(labels, minlength=k).float()
    return "weight" if counts.max() > 1.5 * counts[counts > 0].min() else "none"


def epoch_order(n: int, labels: torch.Tensor, balance: str, k: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's image order: a permutation, or a class-balanced sample with replacement."""
    if balance == "sample":
        w = class_weights(labels, k)[labels]
        return torch.multinomial(w, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                   budget_used: Callable[[], float] | None = None):
    """Warm-up, then cosine (or constant) per step. `budget_used()` (the fraction of the time budget spent)
    moves the cosine ahead of the step count when the clock, not the epochs, will end training, so the
    learning rate has decayed when the budget stops the run on a slower-than-probed machine."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min" if cfg.monitor == "loss" else "max",
                                                          factor=0.5, patience=max(1, cfg.patience // 2))
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if budget_used is not None:
            progress = max(progress, budget_used())
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

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
    preset = PRESETS[cfg.augment]
    batches = order.split(cfg.batch_size)
    if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm cannot train on a single image
        batches = batches[:-1]
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
    m = evaluate_predictions(labels, probs, classes)
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return {"val_loss": float(-np.log(p).mean()), "val_accuracy": m["accuracy"],
            "val_balanced_accuracy": m["balanced_accuracy"], "val_auc": m["auc"], "val_f1_macro": m["f1_macro"]}


def monitor_score(row: dict, monitor: str) -> float:
    """Higher is better. AUC falls back to accuracy when undefined (one class in val)."""
    if monitor == "loss":
        return -row["val_loss"]
    value = row[f"val_{monitor}"]
    return row["val_accuracy"] if value is None or not math.isfinite(value) else value


def make_run_dir(cfg: TrainConfig, data_name: str, force: bool) -> Path:
    out = Path(cfg.out) if cfg.out else Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{data_name}"
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MedclfError(f"run directory {out} exists; pass --force to overwrite it or --resume {out} to continue")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def train(config: TrainConfig | dict | None = None, *, force: bool = False, resume: str | None = None,
          progress: bool = True, **overrides: Any) -> dict:
    """Train a classifier; returns {"out", "metrics", "history"}. Same as `medclf train`."""
    cfg, state, explicit = _resolve_config(config, resume, overrides)
    base = models.read_checkpoint(cfg.weights) if cfg.weights not in ("none", "imagenet") else None
    source, the_plan = None, None
    if cfg.plan and not resume and not set(PLANNED) <= explicit:
        source = open_data(cfg)
        the_plan = apply_plan(cfg, source, base, explicit, progress)
    gen = runtime.seed_everything(cfg.seed)
    source, stores, spec, skipped = load_data(cfg, base, source)
    out = Path(resume) if resume else make_run_dir(cfg, source.name, force)
    cfg.out = str(out)
    if base is None and cfg.weights != "imagenet":
        spec["weights"] = "none"
    else:
        spec["weights"] = cfg.weights
    device = runtime.pick_device(cfg.device)
    precision = runtime.pick_precision(cfg.precision, device)
    channels_last = runtime.use_channels_last(cfg.channels_last, device, precision)
    k = spec["num_classes"]
    train_store, val_store = stores["train"], stores["val"]
    balance = resolve_balance(cfg, train_store.labels, k)
    resolved = {**cfg.to_dict(), "size": spec["input_size"], "channels": spec["in_chans"], "stem": spec["stem"],
                "model": spec["arch"], "balance": balance, "device": str(device), "precision": precision,
                "channels_last": channels_last}
    if not resume:
        save_yaml(resolved, out / "config.yaml")
        if the_plan is not None:
            save_plan(the_plan, out / "plan.yaml")
            (out / "fingerprint.json").write_text(json.dumps(plain(the_plan["fingerprint"]), indent=2))
        splits.write_split_file(out / "splits.csv", {s: st.ids for s, st in stores.items()},
                                {s: st.labels.numpy() for s, st in stores.items()}, source.classes)
        if skipped:
            (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
            print(f"skipped {len(skipped)} unreadable image(s); listed in {out / 'skipped.txt'}")

    model = build(cfg, spec, base).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(cfg, model)
    steps = max(1, len(train_store) // cfg.batch_size)
    started = time.perf_counter()  # the time budget's clock
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
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        gen.set_state(state["generator"])
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
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(monitor_score(row, cfg.monitor))
            score = monitor_score(row, cfg.monitor)
            extra = {"config": resolved, "epoch": epoch + 1, "val": {k2: v for k2, v in row.items() if k2.startswith("val_")}}
            if score > best:
                best, bad_epochs = score, 0
                torch.save(models.checkpoint_dict(scored, spec, extra), out / "model.pt")
            else:
                bad_epochs += 1
            _save_last(out, model, ema, spec, extra, optimizer, scheduler, history, best, epoch + 1, gen)
            write_history(out / "history.csv", history)
            epochs.set_postfix(loss=f"{train_loss:.4f}", **{f"val_{cfg.monitor}": f"{row.get(f'val_{cfg.monitor}', 0) or 0:.4f}"})
            if cfg.patience and bad_epochs >= cfg.patience:
                stop_reason = f"early stop: no {cfg.monitor} gain in {cfg.patience} epochs"
                break
            elapsed = time.perf_counter() - started
            if cfg.time_budget and (elapsed + elapsed / (epoch + 1 - start_epoch) > cfg.time_budget * 60
                                    or time.perf_counter() > deadline):
                stop_reason = f"time budget of {cfg.time_budget:g} min reached"
                break
    except KeyboardInterrupt:
        epochs.close()
        raise MedclfError(f"interrupted; the last finished epoch is saved: resume with `medclf train --resume {out}`") from None
    epochs.close()
    print(f"{stop_reason} after {len(history)} epoch(s), {time.perf_counter() - started:.0f} s")
    metrics = finish_run(out, stores, spec, cfg, device, precision, channels_last)
    return {"out": str(out), "metrics": metrics, "history": history}


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
        torch.save(ckpt, out / "model.pt")
    results = json_safe(results)
    import json

    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    summary = ", ".join(f"{s} acc {r['accuracy']:.4f} auc {r['auc'] if r['auc'] is None else round(r['auc'], 4)}"
                        for s, r in results.items())
    print(f"{summary} → {out}")
    from .reporting import run_report  # matplotlib: imported once training is done

    run_report.write_run_outputs(out, results, curves, spec["classes"], stores, str(device))
    return results


def _save_last(out, model, ema, spec, extra, optimizer, scheduler, history, best, epoch, gen) -> None:
    state = models.checkpoint_dict(model, spec, extra)
    state.update({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                  "best": best, "epoch": epoch, "generator": gen.get_state()})
    if ema is not None:
        state["ema"] = ema.state_dict()
    tmp = out / "last.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / "last.pt")  # atomic: Ctrl-C during the save never corrupts the last checkpoint


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
