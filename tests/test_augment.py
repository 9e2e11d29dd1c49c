import pytest
import torch

from medclf.data.augment import PRESETS, AugmentPreset, affine_matrices, geometric, prepare_batch, random_erase


def batch(n=6, c=1, s=16):
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8)


def test_no_augmentation_is_plain_normalisation():
    x = batch()
    out = prepare_batch(x, 16, [0.5], [0.5], 1)
    assert torch.allclose(out, (x.float() / 255 - 0.5) / 0.5)


def test_resize_and_channel_expansion():
    out = prepare_batch(batch(), 24, [0.5] * 3, [0.5] * 3, 3)
    assert out.shape == (6, 3, 24, 24) and torch.isfinite(out).all()


def test_identity_affine_reproduces_image():
    preset = PRESETS["none"]
    theta = affine_matrices(3, preset)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, -1, -1))


def test_flip_only_preset_flips_some_images_exactly():
    from dataclasses import replace

    preset = replace(PRESETS["none"], flip=0.5)
    x = batch(n=64)
    gen = torch.Generator().manual_seed(0)
    out = prepare_batch(x, 16, [0.0], [1.0], 1, preset, gen)
    ref = x.float() / 255
    flipped = [torch.allclose(o, r.flip(-1), atol=1e-5) for o, r in zip(out, ref)]
    kept = [torch.allclose(o, r, atol=1e-5) for o, r in zip(out, ref)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 15 < sum(flipped) < 49  # about half


def test_presets_change_images_per_sample_and_keep_shape():
    x = batch(n=8, s=20)
    for name in ("light", "strong"):
        out = prepare_batch(x, 28, [0.5], [0.5], 1, PRESETS[name], torch.Generator().manual_seed(1))
        assert out.shape == (8, 1, 28, 28) and torch.isfinite(out).all()
    same = x[:1].expand(8, -1, -1, -1).contiguous()
    out = prepare_batch(same, 20, [0.5], [0.5], 1, PRESETS["light"], torch.Generator().manual_seed(2))
    assert not torch.allclose(out[0], out[1])  # each image gets its own random transform


def test_random_erase_zeros_rectangles_with_probability():
    x = torch.ones(200, 1, 16, 16)
    out = random_erase(x, 0.5, torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1).any(1)
    assert 60 < int(erased.sum()) < 140
    assert torch.equal(random_erase(x, 0.0), x)


def test_eval_resize_matches_training_sampler():
    # Inference must resample exactly as training does when augmentation draws the identity; a different
    # resize (antialiased interpolate) shifted PneumoniaMNIST's calibration (val accuracy 0.971 -> 0.876).
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    train_view = geometric(x.float() / 255, 64, AugmentPreset(), torch.Generator().manual_seed(0))  # the identity
    eval_view = prepare_batch(x, 64, [0.0], [1.0], 1)
    torch.testing.assert_close(eval_view, train_view)


def test_eval_crop_is_the_mean_training_crop_side():
    for name in ("light", "strong"):
        preset = PRESETS[name]
        square = AugmentPreset(scale=preset.scale)  # aspect 1, no rotation: theta[0, 0] is the crop side
        sides = affine_matrices(20000, square, torch.Generator().manual_seed(0))[:, 0, 0]
        assert abs(sides.mean().item() - preset.eval_crop) < 0.005
    assert PRESETS["none"].eval_crop == 1.0


def test_center_crop_keeps_the_middle():
    x = torch.zeros(2, 1, 40, 40, dtype=torch.uint8)
    x[..., 10:30, 10:30] = 255  # the middle half of each side is white
    out = prepare_batch(x, 32, [0.0], [1.0], 1, crop=0.5)
    assert out.shape == (2, 1, 32, 32)
    assert out[..., 1:-1, 1:-1].min() > 0.99  # only the white square is left (bilinear blurs the outer pixel)
    assert out.mean() > 0.95


def test_rotation_adds_no_black_corners():
    x = torch.full((8, 1, 28, 28), 200, dtype=torch.uint8)
    out = prepare_batch(x, 64, [0.0], [1.0], 1, AugmentPreset(rotate=30.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.full_like(out, 200 / 255))


@pytest.mark.parametrize("channels", [1, 3])
def test_center_crop_shares_one_grid_and_equals_a_grid_per_image(channels):
    """center_crop computes its sampling grid once and samples the batch as the channels of one image (the
    exported graph then does too); the pixels are exactly those of torch's own per-image grids."""
    import torch.nn.functional as F

    from medclf.data.augment import center_crop

    x = torch.rand(5, channels, 60, 60, generator=torch.Generator().manual_seed(0))
    theta = torch.tensor([[0.875, 0.0, 0.0], [0.0, 0.875, 0.0]]).expand(5, 2, 3)
    grid = F.affine_grid(theta, [5, channels, 32, 32], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    assert torch.equal(center_crop(x, 32, 0.875), expected)
