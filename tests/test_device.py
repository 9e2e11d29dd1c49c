"""CUDA as a first-class device, checked on the CPU: no host synchronisation per step, where the decoded store
lives, augmentation on the batch's own device, cuDNN/bf16/channels_last choices, torch.compile.
The tests marked `cuda` run only where a GPU is present."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from medclf import runtime, training
from medclf.cli import main
from medclf.config import TrainConfig
from medclf.data import placement
from medclf.data.augment import AugmentPreset, prepare_batch
from medclf.data.store import Store
from medclf.inference import predict_store

from conftest import FAST_FLAGS, make_split_folder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZE = 16


def _store(n: int, channels: int = 1, seed: int = 0) -> Store:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return Store(images, torch.arange(n) % 2, [f"img{i}" for i in range(n)])


def _spec() -> dict:
    return {"input_size": SIZE, "mean": [0.5], "std": [0.25], "in_chans": 1, "num_classes": 2, "crop": 1.0}


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _epoch(n_images: int, device: torch.device, loss_fn=None, progress: bool = False) -> float:
    """One training epoch of the tiny model on n_images (batches of 16, light augmentation)."""
    model = _tiny_model().to(device)
    cfg = TrainConfig(batch_size=16, augment="light", intensity=0.5, grad_clip=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # no state that reads values back
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    env = {"device": device, "precision": "fp32", "channels_last": False, "progress": progress,
           "scaler": torch.amp.GradScaler(device.type, enabled=False)}
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(n_images, generator=gen)
    return training.train_one_epoch(model, _store(n_images), order, _spec(), optimizer, scheduler,
                                    loss_fn or nn.CrossEntropyLoss(), cfg, env, gen)


# ---------------------------------------------------------------- no host synchronisation per step

def test_epoch_loss_is_the_image_weighted_mean_of_the_step_losses():
    """The loss summed on the device gives exactly what summing `loss.item() * n` per step gave."""
    steps: list[tuple[torch.Tensor, int]] = []
    base = nn.CrossEntropyLoss()

    def recording(logits, labels):
        loss = base(logits, labels)
        steps.append((loss.detach().clone(), len(labels)))
        return loss

    mean = _epoch(56, torch.device("cpu"), recording)  # batches of 16, 16, 16, 8
    assert [n for _, n in steps] == [16, 16, 16, 8]
    total = 0.0
    for loss, n in steps:  # the per-step reading the loop used to do
        total += loss.item() * n
    assert mean == total / 56


class _Reads:
    """Counts the Tensor methods that copy a value to the host (each one waits for a GPU to finish its queue)."""
    METHODS = ("item", "cpu", "tolist", "numpy")

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def method(tensor, *args, **kwargs):
            self.calls += 1
            return original(tensor, *args, **kwargs)
        return method


def test_the_training_loop_reads_no_value_back_per_step(monkeypatch):
    reads = _Reads(monkeypatch)
    _epoch(32, torch.device("cpu"))  # 2 steps
    two_steps = reads.calls
    reads.calls = 0
    _epoch(160, torch.device("cpu"))  # 10 steps
    assert reads.calls == two_steps == 1  # the epoch's mean loss, once


def test_the_progress_bar_reads_the_loss_every_n_steps_only(monkeypatch):
    monkeypatch.setattr(training, "PROGRESS_EVERY", 4)
    reads = _Reads(monkeypatch)
    _epoch(160, torch.device("cpu"), progress=True)  # 10 steps: bar updates after steps 4 and 8, then the mean
    assert reads.calls == 3


def test_prediction_reads_the_probabilities_back_once(monkeypatch):
    model = _tiny_model().eval()
    reads = _Reads(monkeypatch)
    small = predict_store(model, _store(20), _spec(), torch.device("cpu"), "fp32", False, batch_size=10)
    few = reads.calls
    reads.calls = 0
    large = predict_store(model, _store(100), _spec(), torch.device("cpu"), "fp32", False, batch_size=10)
    assert reads.calls == few <= 2  # the concatenated probabilities: .cpu() then .numpy()
    assert small.shape == (20, 2) and large.shape == (100, 2)
    np.testing.assert_allclose(large[:20], small, rtol=1e-5)  # same images (same seed), same probabilities


# ---------------------------------------------------------------- where the decoded store lives

GIB = 2**30


def _free_memory(monkeypatch, free: int) -> None:
    monkeypatch.setattr(placement.torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))


def test_a_store_that_fits_the_gpu_goes_there_once(monkeypatch):
    _free_memory(monkeypatch, 40 * GIB)
    decided = placement.decide_placement(10 * GIB, torch.device("cuda"))
    assert decided.on_device
    assert "10.00 GiB" in decided.reason and "50% of the GPU's 40.00 GiB free" in decided.reason


def test_a_store_too_large_for_the_gpu_stays_in_pinned_host_memory(monkeypatch):
    _free_memory(monkeypatch, 40 * GIB)
    decided = placement.decide_placement(21 * GIB, torch.device("cuda"))
    assert not decided.on_device and "pinned host memory" in decided.reason
    assert not placement.decide_placement(8 * GIB, torch.device("cuda"), copies=3).on_device  # 24 GiB > 20 GiB
    assert placement.decide_placement(6 * GIB, torch.device("cuda"), copies=3).on_device


def test_on_the_cpu_the_store_stays_where_it_is(monkeypatch):
    monkeypatch.setattr(placement.torch.cuda, "mem_get_info", lambda device=None: pytest.fail("asked a GPU"))
    stores = {"train": _store(4)}
    placed, decided = placement.place_stores(stores, ("train", "val"), torch.device("cpu"))
    assert placed is stores and not decided.on_device and "host memory (cpu)" in decided.reason


def test_only_the_splits_read_every_epoch_move_and_together(monkeypatch):
    stores = {"train": _store(64), "val": _store(32), "test": _store(32)}  # 16 KiB, 8 KiB, 8 KiB
    moved = []
    monkeypatch.setattr(placement, "to_device", lambda store, device: moved.append(len(store)) or store)
    _free_memory(monkeypatch, 2 * 24 * 1024 - 1)  # half of it: 1 byte short of train+val
    assert not placement.place_stores(stores, ("train", "val"), torch.device("cuda"))[1].on_device and moved == []
    _free_memory(monkeypatch, 2 * 24 * 1024)
    placed, decided = placement.place_stores(stores, ("train", "val"), torch.device("cuda"))
    assert decided.on_device and moved == [64, 32] and placed["test"] is stores["test"]


def test_a_memory_mapped_store_moves_in_pieces(tmp_path, monkeypatch):
    images = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(10, 1, SIZE, SIZE))
    images[:] = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    monkeypatch.setattr(placement, "COPY_CHUNK_BYTES", 3 * SIZE * SIZE)  # 3 images per piece: 4 pieces
    moved = placement.to_device(Store(images, torch.zeros(10, dtype=torch.long), list("abcdefghij")),
                                torch.device("cpu"))
    assert isinstance(moved.images, torch.Tensor) and torch.equal(moved.images, torch.from_numpy(np.array(images)))


def test_batches_are_the_same_images_wherever_the_store_lives():
    store, idx = _store(20), torch.tensor([7, 3, 3, 19])
    images, labels = placement.batch_on_device(store, idx, torch.device("cpu"))
    assert torch.equal(images, store.images[idx]) and torch.equal(labels, store.labels[idx])


@cuda
def test_a_store_on_the_gpu_gives_the_host_stores_batches():
    store, idx, gpu = _store(20), torch.tensor([7, 3, 3, 19]), torch.device("cuda")
    on_gpu = placement.to_device(store, gpu)
    for source in (store, on_gpu):  # pinned host gather, then a gather on the GPU
        images, labels = placement.batch_on_device(source, idx, gpu)
        assert images.device.type == "cuda" and torch.equal(images.cpu(), store.images[idx])
        assert torch.equal(labels.cpu(), store.labels[idx])


@cuda
def test_a_gpu_epoch_synchronises_with_the_host_once(monkeypatch):
    """CUDA's own detector: every synchronising call (`.item()`, a blocking copy, nonzero) in the epoch warns;
    the one expected is the epoch's mean loss at its end."""
    real, warned = training.train_one_epoch, []

    def watched(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warned.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))

    monkeypatch.setattr(training, "train_one_epoch", watched)
    _epoch(64, torch.device("cuda"))  # 4 steps
    assert len(warned) == 1, warned


# ---------------------------------------------------------------- augmentation on the batch's device

class _HostWork(TorchDispatchMode):
    """Every op's outputs: large tensors made on the host, and blocking copies to another device."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.large_on_host, self.blocking_copies = limit, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name.startswith("aten._to_copy") and kwargs.get("device") not in (None, torch.device("cpu")) \
                and not kwargs.get("non_blocking"):
            self.blocking_copies.append(name)
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.numel() > self.limit:
                self.large_on_host.append((name, tuple(tensor.shape)))
        return out


def test_augmentation_builds_the_batch_on_its_device_without_blocking_copies():
    """On the `meta` device (no data, any op runs): the per-image random numbers are the only host tensors, and
    they move without blocking. TrivialAugment (torchvision, one op per image group) and pixel noise (a generator
    on the batch's device) are left out: `meta` has neither."""
    n = 32
    preset = AugmentPreset(flip=0.5, scale=(0.5, 1.0), ratio=(0.8, 1.25), rotate=15.0, erase=1.0, brightness=0.3,
                           contrast=0.3, gamma=0.3, blur=1.0, blur_sigma=0.05)
    x = torch.empty((n, 1, 64, 64), dtype=torch.uint8, device="meta")
    with _HostWork(limit=6 * n) as seen:  # an affine matrix per image: 6 numbers
        out = prepare_batch(x, 48, [0.5], [0.25], 1, preset, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == (n, 1, 48, 48)
    assert seen.large_on_host == [] and seen.blocking_copies == []


# ---------------------------------------------------------------- the CUDA settings

def test_cuda_runs_with_cudnn_benchmark_bf16_and_channels_last(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runtime.tune_backend(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    runtime.tune_backend(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.pick_precision("auto", gpu) == "bf16" and runtime.use_channels_last(None, gpu, "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert runtime.pick_precision("auto", gpu) == "fp16"


def test_compile_trains_the_compiled_model_and_saves_the_plain_one(tmp_path, monkeypatch):
    """`--compile` on the CPU with TorchDynamo's graph capture and the eager backend (Inductor's C++ code
    generation would take minutes here): the training steps run the compiled module, the checkpoint holds the
    model's own parameter names."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--size", "16", "--compile", "--out", str(run)]) == 0
    assert compiled == ["ResNet"]
    state = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    assert not any(key.startswith("_orig_mod") for key in state)


# ---------------------------------------------------------------- the plan on a faster device

COST = {"resnet18": 1.0, "resnet34": 2.0, "resnet50": 2.3}  # relative training compute per image


def _device_probe(small28_img_per_s: float, out_of_memory: tuple[str, ...] = ()):
    """A timing probe of a device `small28_img_per_s` fast (the small stem at 28 px): cost ∝ pixels reaching layer1
    × model depth, as measured on real devices within a factor of ~2."""
    def probe(arch, k, channels, stem, size, store_size, batch_size, augment, device, max_seconds, max_steps,
              intensity=0.0):
        if arch in out_of_memory:
            raise torch.OutOfMemoryError("CUDA out of memory")
        side = size if stem == "small" else size / 4
        rate = small28_img_per_s * (28 / side) ** 2 / COST[arch]
        return {"train_img_per_s": rate, "infer_img_per_s": 5 * rate, "steps": 1, "batch_size": batch_size,
                "warmup_s": 0.0, "device": "fake"}
    return probe


def _large_xray_set(n_train: int = 30_000) -> dict:
    return {"data": "x", "name": "x", "kind": "folder", "classes": ["a", "b"], "num_classes": 2,
            "images": {"train": n_train, "val": n_train // 10}, "imbalance_ratio": 1.0,
            "short_side": {"median": 1024}, "channels": 1, "bit_depth": 8}


def test_a_faster_device_gets_a_larger_size_and_a_deeper_model_by_the_same_rule(monkeypatch):
    from medclf import planning

    monkeypatch.setattr(planning, "probe", _device_probe(20))  # a CPU
    slow = planning.make_plan(_large_xray_set(), time_budget=60)
    monkeypatch.setattr(planning, "probe", _device_probe(2000))  # a GPU, 100x faster
    fast = planning.make_plan(_large_xray_set(), time_budget=60)
    assert slow["settings"]["model"] == "resnet18" and slow["settings"]["size"] < 224
    assert fast["settings"]["size"] == 224 and fast["settings"]["model"] == "resnet50"
    deeper = fast["probe"][-1]
    assert deeper["model"] == "resnet50" and deeper["epochs_in_budget"] >= 2 * planning.min_epochs(30_000)
    assert str(deeper["epochs_in_budget"]) in fast["reasons"]["model"]
    assert fast["settings"]["epochs"] == deeper["epochs_in_budget"]  # the schedule is the deeper model's
    assert "resnet50, imagenet stem 224 px" in planning.format_plan(fast, _large_xray_set())


def test_depth_needs_a_large_set_room_in_the_budget_and_gpu_memory(monkeypatch):
    from medclf import planning

    monkeypatch.setattr(planning, "probe", _device_probe(2000))
    assert planning.make_plan(_large_xray_set(5000), time_budget=60)["settings"]["model"] == "resnet18"
    tight = planning.make_plan(_large_xray_set(), time_budget=10)  # 224 px fits, a deeper model's 6 epochs do not
    assert tight["settings"]["size"] == 224 and tight["settings"]["model"] == "resnet18"
    monkeypatch.setattr(planning, "probe", _device_probe(2000, out_of_memory=("resnet50",)))
    assert planning.make_plan(_large_xray_set(), time_budget=60)["settings"]["model"] == "resnet34"
    fixed = planning.make_plan(_large_xray_set(), time_budget=60, fixed={"model": "resnet18"})
    assert fixed["settings"]["model"] == "resnet18" and fixed["reasons"]["model"] == "set by you"


# ---------------------------------------------------------------- the EMA of the weights

def _ema(model: nn.Module) -> torch.optim.swa_utils.AveragedModel:
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
                                               use_buffers=True)


def _nudge(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (step + 1) * (i + 1))
        model[1].num_batches_tracked += 1  # an integer buffer: averaged in its own group


def test_the_ema_update_averages_as_torch_does():
    model = _tiny_model()
    ours, torchs = _ema(model), _ema(model)
    for step in range(3):
        _nudge(model, step)
        training.update_ema(ours, model)
        torchs.update_parameters(model)
    for (name, a), b in zip(ours.state_dict().items(), torchs.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_ema_update_makes_no_blocking_copy_to_the_models_device():
    """torch's own update copies its step counter to the model's device every step (a blocking copy)."""
    model = _tiny_model().to("meta")
    ema = _ema(model)
    for step in range(2):
        with _HostWork(limit=1) as seen:
            training.update_ema(ema, model)
        assert seen.blocking_copies == [] and seen.large_on_host == []
    assert int(ema.n_averaged) == 2


def test_a_run_with_ema_keeps_the_average_of_every_step(tmp_path):
    data = make_split_folder(tmp_path / "d")  # 48 training images: 3 steps of 16
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--size", "16", "--ema", "0.5", "--out", str(run)]) == 0
    last = torch.load(run / "last.pt", weights_only=False)
    assert int(last["ema"]["n_averaged"]) == 3
    kept = torch.load(run / "model.pt", weights_only=False)["state_dict"]  # the EMA weights, not the last step's
    assert any(not torch.equal(kept[k], last["state_dict"][k]) for k in kept if kept[k].is_floating_point())
