"""Inference engines at 224 px, end to end (image files → probabilities, decode included), in one process.

Arms, timed alternately round by round on the same image files:
  plain       the loop people copy: torchvision ImageFolder + PIL + DataLoader (2 workers, batch 32), fp32 eager
  torch_fp32  medclf predict's torch engine (threaded reduced-size JPEG decode, channels_last fp32)
  torch_bf16  the same under bf16 autocast, only where the CPU has avx512_bf16 or AMX
  onnx_fp32   medclf predict --engine onnx (ONNX Runtime, preprocessing inside the graph)
  onnx_int8   the same on the static int8 model (`medclf export --quantize int8`; predict --precision int8)
  openvino_fp32, openvino_int8   medclf predict --engine openvino on the same two files (where OpenVINO is installed)

The model is a ResNet-18 with a 1-channel ImageNet stem and 2 classes (the chest X-ray shape); speed does
not depend on the weights, so by default they are random. --run RUN times a trained 224 px run instead
(its int8 accuracy/AUC change on validation is then meaningful).

    python benchmarks/speed.py --modes engines [--images 300] [--rounds 3] [--run RUN]
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import build_model as reference_model, load_gray  # noqa: E402 - the baseline's own pieces

SIZE = 224
PLAIN_BATCH = 32
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                     "amx_tile")


def cpu_description() -> dict:
    model, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "key_flags": [f for f in INTERESTING_FLAGS if f in flags],
            "flags": " ".join(flags)}


def image_folder(source: Path, count: int, workdir: Path) -> Path:
    """`count` images of source/train/<class>/ linked into workdir/images/<class>/ (ImageFolder's layout)."""
    files = sorted((source / "train").glob("*/*"))
    step = max(1, len(files) // count)
    target = workdir / "images"
    for f in files[::step][:count]:
        (target / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, target / f.parent.name / f.name)
    return target


def random_run(workdir: Path, data: Path) -> Path:
    """A checkpoint of the benchmark's shape: medclf's own spec at 224 px, crop as training's default preset."""
    from medclf.config import TrainConfig
    from medclf.data.augment import PRESETS
    from medclf.models import build_model, checkpoint_dict, data_config, model_spec

    spec = model_spec("resnet18", ["NORMAL", "PNEUMONIA"], 1, "imagenet", SIZE, **data_config("none", 1))
    spec.update(store_size=SIZE, crop=PRESETS[TrainConfig().augment].eval_crop,
                config={"data": str(data), "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1})
    torch.manual_seed(0)
    run = workdir / "run"
    run.mkdir()
    torch.save(checkpoint_dict(build_model("resnet18", 2, 1, "imagenet").eval(), spec), run / "model.pt")
    return run


def plain_arm(images: Path, ckpt: dict):
    """The reference loop on the same weights (torchvision's ResNet-18 keys are medclf's)."""
    model = reference_model(2, "imagenet")
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    tf = transforms.Compose([transforms.Resize((SIZE, SIZE)), transforms.ToTensor(),
                             transforms.Normalize(mean=[0.5], std=[0.5])])
    dataset = torchvision.datasets.ImageFolder(str(images), tf, loader=load_gray)

    def run() -> int:
        loader = torch.utils.data.DataLoader(dataset, batch_size=PLAIN_BATCH, num_workers=2)
        n = 0
        with torch.no_grad():
            for x, _ in loader:
                model(x).softmax(1)
                n += len(x)
        return n
    return run


def medclf_arm(images: Path, loaded):
    from medclf.inference import input_store

    def run() -> int:
        store = input_store(loaded.ckpt, [str(images)])
        return len(loaded.predict(store))
    return run


def graph_arm(images: Path, ckpt: dict, model_file: Path, engine: str):
    """medclf predict's graph engine (`onnx` or `openvino`) on one exported file, fp32 or int8."""
    from medclf.exporting import onnx_runner, openvino_runner
    from medclf.inference import GRAPH_BATCH, GraphModel

    runner = (openvino_runner if engine == "openvino" else onnx_runner)(model_file)
    precision = "int8" if "int8" in model_file.name else "fp32"
    return medclf_arm(images, GraphModel(runner, ckpt, engine, precision, GRAPH_BATCH[engine]))


def run_engines(args) -> dict:
    import medclf
    from medclf.inference import load_for_inference, openvino_engine_available
    from medclf.runtime import cpu_has_fast_bf16

    cpu = cpu_description()
    print(json.dumps({"cpu": cpu}), flush=True)
    with tempfile.TemporaryDirectory(prefix="medclf-engines-") as tmp:
        workdir = Path(tmp)
        os.environ["MEDCLF_DATA"] = str(workdir / "medclf_data")
        data = Path(args.data)
        images = image_folder(data, args.images, workdir)
        run = Path(args.run) if args.run else random_run(workdir, data)
        manifest = medclf.export(run, out=workdir / "export", quantize="int8", data=str(data))
        loaded = load_for_inference(run, "cpu", "fp32")
        arms = {"plain": plain_arm(images, loaded.ckpt), "torch_fp32": medclf_arm(images, loaded)}
        if cpu_has_fast_bf16():
            arms["torch_bf16"] = medclf_arm(images, load_for_inference(run, "cpu", "bf16"))
        for engine in ("onnx", "openvino") if openvino_engine_available() else ("onnx",):
            arms[f"{engine}_fp32"] = graph_arm(images, loaded.ckpt, workdir / "export" / "model.onnx", engine)
            arms[f"{engine}_int8"] = graph_arm(images, loaded.ckpt, workdir / "export" / "model.int8.onnx", engine)
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, arm in arms.items():
                start = time.perf_counter()
                n = arm()
                rates[name].append(n / (time.perf_counter() - start))
                print(json.dumps({"arm": name, "images": n, "images_per_s": round(rates[name][-1], 2)}), flush=True)
    plain = statistics.median(rates["plain"])
    quantization = manifest["quantization"]
    summary = {"size": SIZE, "images": args.images, "rounds": args.rounds, "cpu": cpu["cpu"],
               "key_flags": cpu["key_flags"],
               "images_per_s": {name: round(statistics.median(r), 2) for name, r in rates.items()},
               "ratio_vs_plain": {name: round(statistics.median(r) / plain, 2) for name, r in rates.items()},
               "int8_validation_change": quantization["change"], "int8_within_tolerance": quantization["within_tolerance"],
               "weights": "trained run" if args.run else "random (speed only)"}
    print(json.dumps({"engines_summary": summary}), flush=True)
    return summary
