"""One training step (augmentation, forward, backward, AdamW) of medclf's ResNet-18, with its small-map
convolutions (`medclf/cpu_conv.py`) and with torch's plain Conv2d, at the sizes the plan picks for small images.

    python benchmarks/train_step.py [--sizes 32,48,64] [--batch 128] [--steps 6]

Prints one JSON line per size and arm (images/s, median step time), the CPU model and flags first. Both arms
use the training loop's own pieces: `prepare_batch` with the light preset and grayscale intensity, channels_last
where the runtime picks it, fp32 (or the runtime's precision: on a bf16 CPU the small-map path is not taken).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import cpu_description  # noqa: E402


def plain_convs(model: torch.nn.Module) -> torch.nn.Module:
    from medclf.cpu_conv import SmallMapConv2d

    for module in model.modules():
        if isinstance(module, SmallMapConv2d):
            module.__class__ = torch.nn.Conv2d
    return model


def time_steps(size: int, batch: int, steps: int, small_map: bool) -> list[float]:
    from medclf import models, runtime
    from medclf.data.augment import prepare_batch, training_preset

    device = torch.device("cpu")
    precision = runtime.pick_precision("auto", device)
    channels_last = runtime.use_channels_last(None, device, precision)
    torch.manual_seed(0)
    model = models.build_model("resnet18", 6, 1, "imagenet")
    model = (model if small_map else plain_convs(model)).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 6, (batch,))
    preset, generator = training_preset("light", 0.5), torch.Generator().manual_seed(0)
    seconds = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        x = prepare_batch(images, size, [0.5], [0.5], 1, preset, generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="32,48,64")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    cpu = cpu_description()
    print(json.dumps({"cpu": cpu["cpu"], "cores": cpu["cores"], "key_flags": cpu["key_flags"],
                      "torch_threads": torch.get_num_threads()}), flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        rates = {}
        for arm, small_map in (("plain_conv2d", False), ("small_map", True)):
            step = statistics.median(time_steps(size, args.batch, args.steps, small_map))
            rates[arm] = args.batch / step
            print(json.dumps({"size": size, "batch": args.batch, "arm": arm, "step_s": round(step, 3),
                              "images_per_s": round(rates[arm], 1)}), flush=True)
        print(json.dumps({"size": size, "speedup": round(rates["small_map"] / rates["plain_conv2d"], 2)}), flush=True)


if __name__ == "__main__":
    main()
