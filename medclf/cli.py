"""`medclf` command line: parse, call the API, map errors to a one-line message and exit code 2."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .config import CHOICES, TrainConfig
from .errors import MedclfError


FINDINGS_EXIT = 1  # `doctor --strict` found leakage; 2 stays "bad input"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a MedclfError (one line, exit 2) instead of the usage text and an exit."""

    def error(self, message: str):
        raise MedclfError(f"{message} (see `{self.prog} --help`)")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Every training setting as a flag; unset flags stay None so the config file or defaults apply."""
    d = TrainConfig()
    p.add_argument("--model", choices=CHOICES["model"], help=f"architecture (default {d.model})")
    p.add_argument("--weights", help="none | imagenet | PATH to a medclf model.pt to fine-tune (default none)")
    p.add_argument("--finetune", choices=CHOICES["finetune"], help="train everything, or only the classifier head")
    p.add_argument("--size", type=int, help="input side in pixels (default: the data's own size)")
    p.add_argument("--channels", type=int, choices=CHOICES["channels"], help="input channels (default: 1 for grayscale data)")
    p.add_argument("--stem", choices=CHOICES["stem"], help="small: 3×3 stride-1 stem for small images (auto: ≤ 48 px)")
    p.add_argument("--epochs", type=int, help=f"maximum epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"images per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; 0.05 for sgd)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer", choices=CHOICES["optimizer"], help=f"default {d.optimizer}")
    p.add_argument("--schedule", choices=CHOICES["schedule"], help="cosine with warmup (default), plateau, constant")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float, help=f"default {d.label_smoothing}")
    p.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off (default {d.grad_clip})")
    p.add_argument("--patience", type=int, help=f"early stopping patience in epochs, 0 = off (default {d.patience})")
    p.add_argument("--monitor", choices=CHOICES["monitor"], help=f"validation metric to select on (default {d.monitor})")
    p.add_argument("--augment", choices=CHOICES["augment"], help=f"augmentation preset (default {d.augment})")
    p.add_argument("--intensity", type=float,
                   help="brightness/contrast/gamma/blur/noise augmentation strength in [0, 1], 0 = off (default 0)")
    p.add_argument("--balance", choices=CHOICES["balance"], help="class imbalance: weighted loss, balanced sampling")
    p.add_argument("--checkpoint", choices=CHOICES["checkpoint"],
                   help="keep the final weights of the completed schedule, or the best validation epoch's")
    p.add_argument("--folds", type=int, metavar="K",
                   help="K-fold cross-validation on train+val: out-of-fold estimate, the K models as an ensemble")
    p.add_argument("--refit", action="store_const", const=True,
                   help="with --folds: one model retrained on all of train+val instead of the fold ensemble")
    p.add_argument("--no-stop-saturated", dest="stop_saturated", action="store_const", const=False,
                   help="keep training when validation has no errors left (default: finish the schedule early)")
    p.add_argument("--ema", type=float, help="weight EMA decay, e.g. 0.999 (default off)")
    p.add_argument("--tta", action="store_const", const=True, help="test-time augmentation (flip) in final evaluation")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--precision", choices=CHOICES["precision"], help="auto: bf16 where the hardware is fast at it")
    p.add_argument("--channels-last", type=_bool, metavar="BOOL")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--time-budget", type=float, metavar="MIN",
                   help="train for about MIN minutes in all; the plan fits epochs to it and the schedule ends on time (default 10)")
    p.add_argument("--no-plan", dest="plan", action="store_const", const=False,
                   help="do not plan settings from the data: unset flags keep their fixed defaults")
    p.add_argument("--skip-bad", action="store_const", const=True, help="skip unreadable images (listed in the run)")
    p.add_argument("--no-cache", dest="cache", action="store_const", const=False, help="do not cache decoded images")
    p.add_argument("--cache-dir", help="decoded-image cache (default $MEDCLF_DATA/stores)")
    p.add_argument("--out", help="run directory (default runs/<timestamp>-<data>-<6 hex>)")
    add_data_flags(p)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """How to read DATA beyond its path: a label file's columns and image folder, the patient in file names."""
    p.add_argument("--images", metavar="DIR", help="label file: folder its relative paths start from "
                   "(default: the file's folder)")
    p.add_argument("--path-col", metavar="NAME", help="label file: the image path column (default: detected)")
    p.add_argument("--label-col", metavar="NAME", help="label file: the label column (default: detected); "
                   "A,B,C: several 0/1 columns, one per label (multi-label)")
    p.add_argument("--split-col", metavar="NAME", help="label file: the train/val/test column (default: detected)")
    p.add_argument("--group-col", metavar="NAME", help="label file: the patient/study column (default: detected)")
    p.add_argument("--group-pattern", metavar="REGEX",
                   help="the patient in each file name (first capture group, else the match); splits keep a patient "
                        "together")
    p.add_argument("--no-finding", metavar="VALUE", help="multi-label label file (findings joined by |): the label "
                   "of an image without findings (default: No Finding)")


def data_flags(args: argparse.Namespace) -> dict:
    from .data.sources import DATA_OPTIONS

    return {k: getattr(args, k) for k in DATA_OPTIONS if getattr(args, k, None) is not None}


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    """--device and --skip-bad, shared by the commands that run a trained model on images."""
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-bad", action="store_true")


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="medclf", description="Train, evaluate and explain medical image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier on DATA")
    p.add_argument("data", nargs="?", help="folder, .csv/.tsv label file, .npz, or dataset name (see `medclf datasets`)")
    add_train_flags(p)
    p.add_argument("--config", help="config.yaml of an earlier run (flags override it)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine (DistributedDataParallel "
                   "through torchrun's launcher; one per GPU on CUDA); see README for torchrun across machines")

    p = sub.add_parser("tune", conflict_handler="resolve",
                       help="search training settings for DATA with Optuna; each trial an ordinary run under OUT")
    p.add_argument("data", help="folder, .csv/.tsv label file, .npz, or dataset name (see `medclf datasets`)")
    add_train_flags(p)  # a flag given is fixed in every trial and leaves the search
    p.add_argument("--trials", type=int, default=10, help="trials the study holds when done (default 10); "
                   "re-running with a larger N adds trials")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="minutes for the whole study; each trial gets "
                   "the minutes left over the trials left (default: the plan's budget per trial)")
    p.add_argument("--storage", metavar="URL", help="the study's database (default sqlite:///OUT/tune.db); "
                   "several processes or machines may share one")
    p.add_argument("--study", metavar="NAME", help="the study's name in the database (default medclf)")
    p.add_argument("--out", help="folder for trial-NNN/, tune.db, best.yaml, tune.html (default runs/tune-<data>)")

    p = sub.add_parser("plan", help="fingerprint DATA and plan its training (size, stem, epochs for the time budget, ...)")
    p.add_argument("data", help="folder, .csv/.tsv label file, .npz, or dataset name (see `medclf datasets`)")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="training minutes to plan for (default 10)")
    p.add_argument("--weights", help="PATH to a medclf model.pt to fine-tune: its size and stem are inherited")
    p.add_argument("--out", default="plan.yaml", help="where to save the plan (default plan.yaml; '-' for none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the timing probe")
    add_data_flags(p)

    p = sub.add_parser("evaluate", help="metrics of a trained model on a split of DATA")
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("data")
    p.add_argument("--split", default="test")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--out", help="write the metrics JSON here")
    add_inference_flags(p)
    add_data_flags(p)

    p = sub.add_parser("predict", help="class probabilities for images, folders, or a split of DATA")
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--split", help="treat INPUT as DATA and predict this split")
    p.add_argument("--out", default="predictions.csv")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--engine", choices=["torch", "onnx", "openvino", "auto"], default="torch",
                   help="torch (default); onnx / openvino: ONNX Runtime / OpenVINO on the model's ONNX export (made "
                        "on first use); auto: the fastest of them installed on the CPU")
    p.add_argument("--precision", default="auto",
                   help="auto (default); fp32; int8 with --engine openvino|onnx (quantized once, calibrated on the "
                        "run's training images); bf16/fp16 with --engine torch")
    add_inference_flags(p)
    add_data_flags(p)  # with --split: how to read DATA when it differs from the run's

    p = sub.add_parser("export", help="the model as ONNX or TorchScript plus manifest.json, for use without medclf")
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", help="folder for the model file and manifest.json (default: RUN-export beside the run)")
    p.add_argument("--quantize", choices=["int8"], help="also write an int8 ONNX model (ONNX Runtime static "
                                                         "quantization calibrated on training images)")
    p.add_argument("--data", help="the run's DATA, where it moved since training (for --quantize)")

    p = sub.add_parser("compare", help="train arms × seeds on DATA and compare them on the same images")
    p.add_argument("data", help="folder, .csv/.tsv label file, .npz, or dataset name")
    add_train_flags(p)  # shared by every arm; --weights A,B,... makes one arm per value, --out is the comparison folder
    p.add_argument("--arms", metavar="YAML", help="named flag sets, e.g. {head: {finetune: head}, full: {finetune: full}}")
    p.add_argument("--seeds", type=int, default=3, help="runs per arm, seeds SEED..SEED+N-1 (default 3)")
    p.add_argument("--force", action="store_true", help="retrain runs that already exist under --out")

    p = sub.add_parser("report", help="(re)make RUN/report.html")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--data", help="DATA, when it moved since training (default: the run's config.yaml)")
    p.add_argument("--out", help="where to write the page (default RUN/report.html)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("explain", help="Grad-CAM overlays (PNG) for images")
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--out", default="explain", help="folder for the overlays and explain.csv (default explain/)")
    p.add_argument("--class", dest="target", metavar="CLASS", help="explain this class instead of the prediction")
    add_inference_flags(p)

    p = sub.add_parser("doctor", help="check DATA for duplicates, leakage across splits, label conflicts, odd images")
    p.add_argument("data", help="folder, .csv/.tsv label file, .npz, or dataset name (see `medclf datasets`)")
    p.add_argument("--out", default="doctor", help="folder for doctor.json and doctor.html (default doctor/)")
    p.add_argument("--strict", action="store_true",
                   help=f"exit {FINDINGS_EXIT} when images or patients cross splits or an image has two labels")
    add_data_flags(p)

    sub.add_parser("datasets", help="the named public datasets and whether each is cached")

    p = sub.add_parser("serve", help="the model as an HTTP API with a web page (FastAPI + uvicorn)")
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run directory or model.pt")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, help="largest image in pixels (default 50000000)")
    p.add_argument("--queue", type=int, default=256, help="images queued before requests get 503 (default 256)")

    p = sub.add_parser("cache", help="list, clear or prune the decoded-image cache")
    p.add_argument("action", nargs="?", choices=("list", "clear", "prune"), default="list")
    p.add_argument("--max-size", type=float, metavar="GB", help="prune: evict least recently used stores down to GB")
    p.add_argument("--cache-dir", help="the cache to act on (default $MEDCLF_DATA/stores)")
    return parser


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import medclf

    if args.command == "train":
        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "force", "nproc")}
        if not args.data and not args.config and not args.resume:
            raise MedclfError("give DATA, --config or --resume")
        if args.nproc is not None:
            from . import distributed

            distributed.check_nproc(args.nproc)
            if args.nproc > 1 and not distributed.World.from_environment().active:
                from .training import preflight

                preflight(args.config, resume=args.resume, **flags)
                return distributed.launch(sys.argv[1:] if argv is None else argv, args.nproc)
        medclf.train(args.config, force=args.force, resume=args.resume, **flags)
    elif args.command == "tune":
        study_flags = ("command", "data", "trials", "time_budget", "storage", "study", "out")
        fixed = {k: v for k, v in vars(args).items() if k not in study_flags and v is not None}
        medclf.tune(args.data, trials=args.trials, time_budget=args.time_budget, storage=args.storage, out=args.out,
                    study=args.study, **fixed)
    elif args.command == "plan":
        medclf.plan(args.data, time_budget=args.time_budget, out=None if args.out == "-" else args.out,
                    weights=args.weights or "none", device=args.device, seed=args.seed, do_probe=args.probe,
                    **data_flags(args))
    elif args.command == "evaluate":
        result = medclf.evaluate(args.model, args.data, split=args.split, tta=args.tta, out=args.out,
                                 device=args.device, skip_bad=args.skip_bad, **data_flags(args))
        print(json.dumps(result, indent=2))
    elif args.command == "predict":
        rows = medclf.predict(args.model, args.inputs, split=args.split, out=args.out, tta=args.tta,
                              device=args.device, precision=args.precision, skip_bad=args.skip_bad,
                              engine=args.engine, **data_flags(args))
        print(f"{len(rows)} prediction(s) → {args.out}")
    elif args.command == "export":
        export_command(args)
    elif args.command == "compare":
        flags = {k: v for k, v in vars(args).items() if k not in ("command", "data", "weights", "arms", "seeds", "force", "out")}
        medclf.compare(args.data, weights=args.weights, arms=args.arms, seeds=args.seeds, out=args.out,
                       force=args.force, **flags)
    elif args.command == "report":
        print(f"report → {medclf.report(args.run, data=args.data, out=args.out, device=args.device)}")
    elif args.command == "explain":
        rows = medclf.explain(args.model, args.inputs, out=args.out, target=args.target, device=args.device,
                              skip_bad=args.skip_bad)
        for row in rows:
            print(f"{row['path']}: {row['prediction']} {row['probability']:.3f} → {row['gradcam']}")
    elif args.command == "doctor":
        return doctor_command(args.data, args.out, args.strict, data_flags(args))
    elif args.command == "datasets":
        from .data.named import available, data_home

        from .data.cache import cache_root, human_bytes, total_bytes

        print(f"cache: {data_home()}")
        print(f"decoded stores: {cache_root(None)} ({human_bytes(total_bytes(cache_root(None)))}; `medclf cache`)")
        for row in available():
            print(f"{row['name']:<22} {row['classes']:>3} classes  {'cached' if row['cached'] else '-':<7} {row['task']}")
        print(f"kaggle:OWNER/SLUG      any Kaggle dataset, downloaded with your Kaggle credentials into "
              f"{data_home() / 'kaggle'}")
    elif args.command == "cache":
        cache_command(args.action, args.cache_dir, args.max_size)
    elif args.command == "serve":
        serve_command(args)
    return 0


def doctor_command(data: str, out: str, strict: bool, options: dict) -> int:
    """`medclf doctor`: a summary line per finding; exit FINDINGS_EXIT under --strict when leakage is found."""
    from .doctor import doctor, has_leakage, summary_lines

    findings = doctor(data, out=out, **options)
    for line in summary_lines(findings):
        print(line)
    print(f"doctor → {out}/doctor.html, {out}/doctor.json")
    return FINDINGS_EXIT if strict and has_leakage(findings) else 0


def export_command(args: argparse.Namespace) -> None:
    import medclf

    manifest = medclf.export(args.model, format=args.format, out=args.out, quantize=args.quantize, data=args.data)
    folder = manifest["folder"]
    print(f"{manifest['files']['format']} model → {folder}/{manifest['files']['model']} (manifest.json beside it)")
    report = manifest.get("quantization")
    if report:
        change = report["change"]
        print(f"int8 → {folder}/{manifest['files']['int8']}: validation accuracy {change['accuracy']:+.4f}, "
              f"AUC {change['auc']:+.4f}, {report['speedup']:.2f}× the fp32 speed; "
              f"{'recommended' if report['within_tolerance'] else 'not recommended (outside the tolerance)'}")


def cache_command(action: str, cache_dir: str | None, max_size_gb: float | None) -> None:
    """`medclf cache list|clear|prune --max-size GB`."""
    import time

    from .data import cache

    root = cache.cache_root(cache_dir)
    if action == "list":
        stores = cache.entries(root)
        for e in stores:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "?"
            what = f"{e.meta.get('data', '?')} [{e.meta.get('split', '?')}] {e.meta.get('shape', '?')}"
            print(f"{e.path.name}  {cache.human_bytes(e.nbytes):>9}  used {used}  {what}")
        print(f"{len(stores)} store(s), {cache.human_bytes(cache.total_bytes(root))} in {root}")
        return
    if action == "prune" and (max_size_gb is None or not math.isfinite(max_size_gb) or max_size_gb < 0):
        raise MedclfError("cache prune needs --max-size GB (a finite number, 0 or more): the size to evict down to")
    if action == "clear":
        removed, freed = cache.clear(root)
    else:
        removed, freed = cache.prune(root, int(max_size_gb * 1e9))
    print(f"removed {removed} store(s), freed {cache.human_bytes(freed)}; "
          f"{cache.human_bytes(cache.total_bytes(root))} left in {root}")


def serve_command(args: argparse.Namespace) -> None:
    """`medclf serve`: the limits checked here so a bad flag is one line, not a server that refuses everything."""
    if not 0 < args.max_upload_mb <= 4096 or args.max_pixels < 1 or args.queue < 1 or not 0 <= args.port <= 65535:
        raise MedclfError("serve: --max-upload-mb must be in (0, 4096], --max-pixels and --queue at least 1, "
                          "--port in 0..65535")
    from .serving import Limits, serve

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1e6), max_pixels=args.max_pixels,
                    queue_images=args.queue)
    serve(args.model, host=args.host, port=args.port, device=args.device, limits=limits)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(get_args_parser().parse_args(argv), argv)
    except MedclfError as exc:
        print(f"medclf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: exit 130 as shells expect; training says what it saved
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for every process
            print(f"medclf: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
