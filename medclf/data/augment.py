"""Batched augmentation and preprocessing on tensors: no per-image Python on the hot path.

uint8 N×C×H×W batch → float N×C×S×S, normalised. Geometric augmentation (flip, random resized
crop, rotation) is one random affine matrix per image, applied to the whole batch with a single
`grid_sample`, which also resizes to the model's input size S. TrivialAugmentWide runs from
torchvision on small groups of images (one random op per group), and RandomErasing is a
per-image rectangle mask built with broadcasting. Intensity augmentation (brightness, contrast,
gamma, Gaussian blur, Gaussian noise) draws one factor per image and applies it to all its channels
with broadcasting and one grouped convolution, so colours keep their hue.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentPreset:
    flip: float = 0.0  # probability of a horizontal flip
    scale: tuple[float, float] = (1.0, 1.0)  # area fraction kept by the random resized crop
    ratio: tuple[float, float] = (1.0, 1.0)  # aspect ratio range of the crop
    rotate: float = 0.0  # max rotation, degrees
    trivial: bool = False  # TrivialAugmentWide
    trivial_group: int = 8  # images sharing one TrivialAugment op
    erase: float = 0.0  # probability of RandomErasing
    brightness: float = 0.0  # intensities multiplied by a factor in [1 - b, 1 + b]
    contrast: float = 0.0  # deviations from the image's mean intensity multiplied by a factor in [1 - c, 1 + c]
    gamma: float = 0.0  # intensities raised to a power in [1 / (1 + g), 1 + g] (log-uniform)
    blur: float = 0.0  # probability of a Gaussian blur
    blur_sigma: float = 0.01  # largest blur sigma, as a fraction of the output side
    noise: float = 0.0  # largest standard deviation of additive Gaussian noise (intensities in [0, 1])

    @property
    def moves(self) -> bool:
        """Whether the preset has geometric augmentation (else inference's centre crop applies)."""
        return (self.flip > 0 or self.rotate > 0 or self.scale != (1.0, 1.0) or self.ratio != (1.0, 1.0))

    @property
    def intensity_on(self) -> bool:
        return max(self.brightness, self.contrast, self.gamma, self.blur, self.noise) > 0

    @property
    def eval_crop(self) -> float:
        """Side of the centre crop that inference should see, as a fraction of the image: the mean side of the
        training crops. Random resized crops make anatomy look larger in training than in a full view, which
        shifts predictions (train-test resolution discrepancy, Touvron et al. 2019): chest_xray_400 val
        accuracy 0.80 on full views vs 0.90 on this crop, same model (strong preset)."""
        lo, hi = self.scale
        if hi - lo < 1e-9:
            return math.sqrt(hi)
        return (2 / 3) * (hi ** 1.5 - lo ** 1.5) / (hi - lo)  # E[sqrt(area)] for area ~ U(lo, hi)


PRESETS = {
    "none": AugmentPreset(),
    "light": AugmentPreset(flip=0.5, scale=(0.75, 1.0), ratio=(0.9, 1.1), rotate=10.0),
    "strong": AugmentPreset(flip=0.5, scale=(0.5, 1.0), ratio=(0.8, 1.25), rotate=15.0, trivial=True, erase=0.25),
}


# intensity augmentation at strength 1 (the `intensity` setting scales these): brightness/contrast/gamma of
# ±30%, a blur for one image in three, and noise up to 3% of the intensity range, all within what exposure,
# processing and detector noise vary between scanners
FULL_INTENSITY = {"brightness": 0.3, "contrast": 0.3, "gamma": 0.3, "blur": 1 / 3, "noise": 0.03}


def training_preset(augment: str, intensity: float = 0.0) -> AugmentPreset:
    """The named preset with intensity augmentation at `intensity` (0 = off, 1 = FULL_INTENSITY)."""
    return replace(PRESETS[augment], **{name: value * intensity for name, value in FULL_INTENSITY.items()})


def to_device(small: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A small host tensor (random draws from the CPU generator, a few numbers per image) on `like`'s device and
    dtype. Non-blocking: a blocking copy to a GPU waits for all its queued work, which would stall every step."""
    return small.to(like.device, like.dtype, non_blocking=True)


def affine_matrices(n: int, preset: AugmentPreset, generator: torch.Generator | None = None) -> torch.Tensor:
    """N×2×3 matrices mapping output coordinates to input coordinates (normalised [-1, 1])."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    area = uniform(*preset.scale)
    log_ratio = uniform(math.log(preset.ratio[0]), math.log(preset.ratio[1]))
    aspect = torch.exp(log_ratio)
    sx = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width as a fraction of the image
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    tx = (1 - sx) * (2 * torch.rand(n, generator=generator) - 1)  # keep the crop inside the image
    ty = (1 - sy) * (2 * torch.rand(n, generator=generator) - 1)
    angle = torch.deg2rad(uniform(-preset.rotate, preset.rotate))
    flip = torch.where(torch.rand(n, generator=generator) < preset.flip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx * cos * flip
    theta[:, 0, 1] = -sy * sin
    theta[:, 1, 0] = sx * sin * flip
    theta[:, 1, 1] = sy * cos
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta


def geometric(x: torch.Tensor, size: int, preset: AugmentPreset, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip + resized crop + rotation for a float batch, output S×S."""
    return resample(x, size, affine_matrices(x.shape[0], preset, generator))


def center_crop(x: torch.Tensor, size: int, crop: float) -> torch.Tensor:
    """The centre crop·H × crop·W of a float batch, resized to S×S with the sampler training uses.
    Every image has the same crop, so the sampling grid is computed once and the batch sampled as the channels
    of one image (in an exported graph too, where a grid per image, or one grid expanded to the batch, cost a
    visible share of int8 inference: README, Inference engines)."""
    theta = torch.tensor([[[crop, 0.0, 0.0], [0.0, crop, 0.0]]])
    return resample(x, size, theta)


def resample(x: torch.Tensor, size: int, theta: torch.Tensor) -> torch.Tensor:
    """x sampled at the affine grids `theta` (N×2×3, or 1×2×3: one grid for the whole batch)."""
    # Reflection, not zeros: black rotation corners exist only in training images, and a model learns to
    # expect them (PneumoniaMNIST val accuracy 0.876 on views without them, 0.971 with, same model).
    grid = F.affine_grid(to_device(theta, x), [theta.shape[0], x.shape[1], size, size], align_corners=False)
    n, c, h, w = x.shape
    if theta.shape[0] == 1:  # one grid: sample the batch as the channels of one image
        x = x.reshape(1, n * c, h, w)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.reshape(n, c, size, size)


def trivial_augment(x_uint8: torch.Tensor, group: int) -> torch.Tensor:
    """TrivialAugmentWide with one random op per group of images (torchvision applies one op per call)."""
    from torchvision.transforms import v2

    op = v2.TrivialAugmentWide()
    return torch.cat([op(chunk) for chunk in x_uint8.split(group)])


def random_erase(x: torch.Tensor, p: float, generator: torch.Generator | None = None,
                 scale: tuple[float, float] = (0.02, 0.2), ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """RandomErasing (zeros) on each image with probability p, rectangles drawn per image."""
    n, _, h, w = x.shape
    area = (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)) * h * w
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=generator))
    eh = torch.sqrt(area * aspect).clamp(1, h)
    ew = torch.sqrt(area / aspect).clamp(1, w)
    top = torch.rand(n, generator=generator) * (h - eh)
    left = torch.rand(n, generator=generator) * (w - ew)
    apply = (torch.rand(n, generator=generator) < p).float()
    # the N rectangles go to x's device; the N×H×W mask is built there, not on the host
    rects = torch.stack([top, top + eh, left, left + ew, apply]).to(x.device, non_blocking=True)
    top, bottom, left, right, apply = rects.view(5, n, 1, 1)
    rows = torch.arange(h, device=x.device, dtype=rects.dtype).view(1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=rects.dtype).view(1, 1, w)
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right) & (apply > 0)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def _per_image(n: int, lo: float, hi: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """One uniform draw in [lo, hi] per image, shaped to broadcast over N×C×H×W."""
    return (lo + (hi - lo) * torch.rand(n, generator=generator)).view(n, 1, 1, 1).to(device, non_blocking=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (pixels, at most radius / 3) per image, all images in one grouped
    convolution."""
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / to_device(sigma, x).view(n, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # the same kernel on every channel
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def intensity_augment(x: torch.Tensor, preset: AugmentPreset, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast, gamma, blur and noise on a float [0, 1] batch; each image draws its own factors,
    shared by its channels (no hue change). The result stays in [0, 1]."""
    n, dev = x.shape[0], x.device
    b, c, g = preset.brightness, preset.contrast, preset.gamma
    brightness = _per_image(n, 1 - b, 1 + b, generator, dev)
    contrast = _per_image(n, 1 - c, 1 + c, generator, dev)
    gamma = torch.exp(_per_image(n, -math.log1p(g), math.log1p(g), generator, dev))
    # brightness then contrast around the image's mean, in one pass: b·(c·x + (1 - c)·mean(x))
    shift = brightness * (1 - contrast) * x.mean(dim=(1, 2, 3), keepdim=True)
    x = torch.addcmul(shift, x, brightness * contrast).clamp_(0, 1).pow_(gamma)
    if preset.blur > 0:
        # blurred images are chosen on the CPU generator, so picking them needs no device sync
        picked = (torch.rand(n, generator=generator) < preset.blur).nonzero().flatten()
        largest = preset.blur_sigma * x.shape[-1]
        sigma = largest * (0.1 + 0.9 * torch.rand(n, generator=generator))[picked]
        if len(picked) and largest >= 0.2:  # a smaller sigma changes no pixel noticeably
            picked = picked.to(dev, non_blocking=True)
            x[picked] = gaussian_blur(x[picked], sigma, radius=math.ceil(3 * largest))
    if preset.noise > 0:
        std = _per_image(n, 0, preset.noise, generator, dev)
        # the pixels' noise comes from a generator on x's device, seeded from `generator`: reproducible, no transfer
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        pixels = torch.randn((n, 1, *x.shape[2:]), generator=torch.Generator(dev).manual_seed(seed), device=dev,
                             dtype=x.dtype)
        x.addcmul_(pixels, std)  # one noise image per image, on every channel: no colour noise
    return x.clamp_(0, 1)


def prepare_batch(x_uint8: torch.Tensor, size: int, mean: list[float], std: list[float], channels: int,
                  preset: AugmentPreset | None = None, generator: torch.Generator | None = None,
                  crop: float = 1.0) -> torch.Tensor:
    """uint8 batch (on its target device) → normalised float batch at the model's size and channel count.

    With no augmentation, the centre `crop` fraction of each side is kept (a checkpoint's "crop")."""
    if preset is not None and preset.trivial:
        x_uint8 = trivial_augment(x_uint8, preset.trivial_group)
    x = x_uint8.float().div_(255.0)
    if x.shape[1] != channels:
        x = x.expand(-1, 3, -1, -1) if channels == 3 else x.mean(1, keepdim=True)
    if preset is not None and preset.moves:
        x = geometric(x, size, preset, generator)
    elif crop != 1.0 or x.shape[-1] != size or x.shape[-2] != size:
        x = center_crop(x, size, crop)
    if preset is not None and preset.intensity_on:
        x = intensity_augment(x, preset, generator)
    if preset is not None and preset.erase > 0:
        x = random_erase(x, preset.erase, generator)
    m = to_device(torch.tensor(mean), x).view(1, -1, 1, 1)
    s = to_device(torch.tensor(std), x).view(1, -1, 1, 1)
    return (x - m) / s
