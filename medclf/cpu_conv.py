"""Convolutions whose output maps are tiny (at most SMALL_MAP positions), computed as GEMMs while training on a CPU.

oneDNN computes a convolution's weight gradient on the CPU in fp32 by im2col and one GEMM per image; where the
output map has one to four positions (ResNet's last stages at 32-64 px inputs: a 512x512x3x3 kernel on 1x1 or
2x2 maps) those GEMMs are rank-1 to rank-4 updates and the weight gradient costs several times the whole
forward pass. `_SmallMapConv` unfolds the batch once and takes the weight gradient as a single GEMM over all
images and positions.

Where the output is a single position (a 3x3 kernel on a 1x1 map, or stride 2 from 2x2 to 1x1) most kernel taps
only ever meet zero padding, yet oneDNN computes all of them in the forward pass and both gradients. There
`_SinglePositionConv` keeps only the taps that meet data (on a 1x1 map the convolution is then a linear layer)
and computes the output and both gradients as one GEMM each.

Both keep the kernel's gradient in the kernel's own memory layout (channels_last included), so autograd does not
copy it into that layout afterwards. The results equal the reference up to summation order (tests/test_models.py
checks them in float64); benchmarks/train_step.py times a training step with and without them.

`SmallMapConv2d` is an `nn.Conv2d` (same parameters, same state-dict keys) that takes these paths only while
training on a CPU in fp32 (or fp64) with tiny output maps; everything else (eval, export, CUDA, autocast) is
plain Conv2d.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 4  # output positions (H*W) up to which the GEMM weight gradient is the faster one


def _output_size(size: tuple, kernel: tuple, padding: tuple, stride: tuple) -> tuple[int, int]:
    return tuple((size[i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in (0, 1))


def _tap_major(weight: torch.Tensor) -> torch.Tensor:
    """O x kh*kw x C: the kernel tap by tap (a view when the kernel is channels_last)."""
    out_c, in_c, kh, kw = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(out_c, kh * kw, in_c)


def _kernel_grad(tap_major: torch.Tensor, shape: torch.Size, layout_of: torch.Tensor) -> torch.Tensor:
    """An O x kh*kw x C gradient back in the kernel's shape, in the memory layout of `layout_of`."""
    out_c, in_c, kh, kw = shape
    grad = tap_major.reshape(out_c, kh, kw, in_c).permute(0, 3, 1, 2)  # channels_last memory
    channels_last = layout_of.is_contiguous(memory_format=torch.channels_last) and not layout_of.is_contiguous()
    return grad if channels_last else grad.contiguous()


class _SmallMapConv(torch.autograd.Function):
    """oneDNN's forward and input gradient; the weight gradient as one GEMM over the unfolded batch."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, ctx.stride, ctx.padding, [1, 1],
                                                         False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            out_c, in_c, kh, kw = weight.shape
            n = x.shape[0]
            cols = F.unfold(x, (kh, kw), padding=ctx.padding, stride=ctx.stride).view(n, in_c, kh * kw, -1)
            rows = cols.permute(1, 2, 0, 3).reshape(in_c * kh * kw, -1)  # C*T x N*L
            # summed over images and positions at once: (O x N*L) @ (N*L x C*T), then tap-major
            grad = grad_out.reshape(n, out_c, -1).transpose(0, 1).reshape(out_c, -1) @ rows.t()
            grad_w = _kernel_grad(grad.view(out_c, in_c, kh * kw).transpose(1, 2), weight.shape, weight)
        return grad_x, grad_w, None, None


@functools.lru_cache(maxsize=64)
def _live_taps(height: int, width: int, kernel: tuple, padding: tuple, stride: tuple) -> tuple[tuple, tuple]:
    """For a single output position: the kernel taps (row-major indices into kh*kw) that meet the input, and the
    input position (row-major into height*width) each of them meets."""
    taps, positions = [], []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            row, col = i - padding[0], j - padding[1]
            if 0 <= row < height and 0 <= col < width:
                taps.append(i * kernel[1] + j)
                positions.append(row * width + col)
    return tuple(taps), tuple(positions)


class _SinglePositionConv(torch.autograd.Function):
    """A convolution with a 1x1 output map as a linear layer over the input positions its live taps meet."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        n, in_c, height, width = x.shape
        taps, positions = _live_taps(height, width, tuple(weight.shape[-2:]), tuple(padding), tuple(stride))
        pixels = x.permute(0, 2, 3, 1).reshape(n, height * width, in_c)  # a view of a channels_last batch
        rows = pixels[:, list(positions)].reshape(n, -1)  # N x T*C, tap-major
        w_live = _tap_major(weight)[:, list(taps)].reshape(weight.shape[0], -1)  # O x T*C
        ctx.save_for_backward(rows, w_live, weight)
        ctx.layout = (x.shape, taps, positions, _channels_last(x))
        return (rows @ w_live.t()).view(n, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad_out):
        rows, w_live, weight = ctx.saved_tensors
        (n, in_c, height, width), taps, positions, channels_last = ctx.layout
        g = grad_out.reshape(n, -1)  # N x O
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            pixels = g.new_zeros(n, height * width, in_c)
            pixels[:, list(positions)] = (g @ w_live).view(n, len(taps), in_c)
            grad_x = pixels.view(n, height, width, in_c).permute(0, 3, 1, 2)  # channels_last memory
            grad_x = grad_x if channels_last else grad_x.contiguous()
        if ctx.needs_input_grad[1]:
            out_c, _, kh, kw = weight.shape
            live = (g.t() @ rows).view(out_c, len(taps), in_c)  # summed over the batch
            full = live if len(taps) == kh * kw else live.new_zeros(out_c, kh * kw, in_c)
            if len(taps) < kh * kw:
                full[:, list(taps)] = live
            grad_w = _kernel_grad(full, weight.shape, weight)
        return grad_x, grad_w, None, None


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d whose CPU training step uses `_SinglePositionConv` or `_SmallMapConv` where its output maps are
    tiny."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) \
                and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            oh, ow = _output_size(x.shape[-2:], self.kernel_size, self.padding, self.stride)
            if oh * ow == 1:
                return _SinglePositionConv.apply(x, self.weight, self.stride, self.padding)
            if oh * ow <= SMALL_MAP:
                return _SmallMapConv.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)


def use_small_map_convs(model: nn.Module) -> nn.Module:
    """Swap every plain, bias-free, ungrouped, undilated, zero-padded Conv2d of `model` for a SmallMapConv2d
    sharing its parameters (in place; state-dict keys unchanged)."""
    for module in model.modules():
        for name, child in module.named_children():
            if (type(child) is nn.Conv2d and child.bias is None and child.groups == 1 and child.dilation == (1, 1)
                    and child.padding_mode == "zeros" and isinstance(child.padding, tuple)):
                swapped = SmallMapConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                         child.padding, bias=False, device="meta")
                swapped.weight = child.weight
                setattr(module, name, swapped)
    return model
