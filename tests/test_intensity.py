"""Intensity augmentation (brightness, contrast, gamma, blur, noise): batched, seeded, training only, planned by modality."""
from __future__ import annotations

import pytest
import torch

from medclf import planning
from medclf.config import TrainConfig
from medclf.data.augment import PRESETS, AugmentPreset, gaussian_blur, intensity_augment, prepare_batch, training_preset
from medclf.errors import MedclfError


def batch(n=16, c=1, s=24, seed=0):
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def augmented(x, preset, seed, channels=None):
    """The batch as the model sees it in training, unnormalised (mean 0, std 1): intensities in [0, 1]."""
    channels = channels or x.shape[1]
    return prepare_batch(x, x.shape[-1], [0.0] * channels, [1.0] * channels, channels, preset,
                         torch.Generator().manual_seed(seed))


def test_strength_zero_is_the_plain_preset():
    assert training_preset("light", 0.0) == PRESETS["light"]
    x = batch()
    torch.testing.assert_close(augmented(x, training_preset("none", 0.0), 0), x.float() / 255)


def test_intensity_changes_each_image_within_range():
    x = batch(n=32)
    out = augmented(x, training_preset("none", 1.0), seed=0)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    changed = (out - x.float() / 255).abs().flatten(1).amax(1) > 0.02
    assert changed.all()


def test_intensity_is_deterministic_for_a_seeded_generator():
    x = batch()
    preset = training_preset("light", 1.0)
    torch.testing.assert_close(augmented(x, preset, seed=3), augmented(x, preset, seed=3))
    assert not torch.allclose(augmented(x, preset, seed=3), augmented(x, preset, seed=4))


def test_gray_stays_gray_in_rgb_models():
    out = augmented(batch(n=8), training_preset("light", 1.0), seed=0, channels=3)
    torch.testing.assert_close(out[:, 0], out[:, 1])  # the same factors and noise on every channel: no hue change
    torch.testing.assert_close(out[:, 0], out[:, 2])


def test_brightness_scales_every_channel_of_an_image_alike():
    x = torch.randint(50, 150, (8, 3, 16, 16), dtype=torch.uint8)  # no clamping at ±30%
    out = augmented(x, AugmentPreset(brightness=0.3), seed=0)
    ratio = out / (x.float() / 255)
    per_image = ratio.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image))
    assert per_image[:, 0].min() >= 0.7 - 1e-6 and per_image[:, 0].max() <= 1.3 + 1e-6
    assert per_image[:, 0].std() > 0.01  # one factor per image, not one per batch


def test_contrast_and_gamma_keep_flat_images_and_ends():
    flat = torch.full((6, 1, 8, 8), 0.4)
    torch.testing.assert_close(intensity_augment(flat.clone(), AugmentPreset(contrast=0.3)), flat)
    ends = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(6, 1, 1, 2).contiguous()
    torch.testing.assert_close(intensity_augment(ends.clone(), AugmentPreset(gamma=0.3)), ends)


def test_blur_smooths_and_keeps_the_mean_of_flat_images():
    noise = torch.rand(4, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, torch.tensor([1.0, 1.0, 2.0, 2.0]), radius=6)
    assert (blurred.std(dim=(1, 2, 3)) < 0.6 * noise.std(dim=(1, 2, 3))).all()
    assert blurred[2:].std() < blurred[:2].std()  # a larger sigma smooths more
    flat = torch.full((2, 1, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.5, 1.5]), radius=5), flat)


def test_inference_and_eval_crop_untouched():
    x = batch()
    plain = prepare_batch(x, 24, [0.5], [0.5], 1)
    torch.testing.assert_close(plain, (x.float() / 255 - 0.5) / 0.5)
    assert training_preset("strong", 1.0).eval_crop == PRESETS["strong"].eval_crop


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_intensity_on_cuda_matches_itself_and_stays_on_device():
    x = batch().cuda()
    preset = training_preset("light", 1.0)
    a, b = augmented(x, preset, seed=1), augmented(x, preset, seed=1)
    assert a.device.type == "cuda" and torch.equal(a, b)


def _fingerprint(channels: int) -> dict:
    side = {"median": 64, "p10": 64, "p90": 64}
    return {"data": "x", "kind": "folder", "num_classes": 2, "images": {"train": 400, "val": 100},
            "imbalance_ratio": 1.0, "short_side": side, "channels": channels}


def test_plan_turns_intensity_on_for_grayscale_and_off_for_colour():
    gray = planning.make_plan(_fingerprint(1), do_probe=False)
    colour = planning.make_plan(_fingerprint(3), do_probe=False)
    assert gray["settings"]["intensity"] == planning.GRAY_INTENSITY > 0 and "grayscale" in gray["reasons"]["intensity"]
    assert colour["settings"]["intensity"] == 0.0 and colour["reasons"]["intensity"].startswith("off")
    mine = planning.make_plan(_fingerprint(1), fixed={"intensity": 0.2}, do_probe=False)
    assert mine["settings"]["intensity"] == 0.2 and mine["reasons"]["intensity"] == "set by you"


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_intensity_outside_zero_to_one_is_refused(value):
    with pytest.raises(MedclfError, match="intensity"):
        TrainConfig(data="x", intensity=value).validate()


def test_training_applies_the_configured_intensity(monkeypatch, split_folder, tmp_path):
    from medclf import training

    seen = []
    real = training.prepare_batch

    def spy(*args, **kwargs):
        preset = args[5] if len(args) > 5 else kwargs.get("preset")
        if preset is not None:
            seen.append(preset)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "prepare_batch", spy)
    training.train(data=str(split_folder), out=str(tmp_path / "run"), epochs=1, batch_size=16, patience=0,
                   intensity=0.4, progress=False)
    assert seen  # training batches went through prepare_batch with a preset
    assert all(p.brightness == pytest.approx(0.3 * 0.4) and p.noise == pytest.approx(0.03 * 0.4) for p in seen)
