"""A faster weight gradient for convolutions whose output maps are tiny (at most SMALL_MAP positions) on a CPU.

oneDNN computes a convolution's weight gradient on the CPU in fp32 by im2col and one GEMM per image; where the
output map has one to four positions (ResNet's last stage at 32-64 px inputs: a 512x512x3x3 kernel on 1x1 or
2x2 maps) those GEMMs are rank-1 to rank-4 updates and the weight gradient costs several times the whole
forward pass. Unfolding the batch once and taking a single GEMM over all its positions gives the same sums,
many times faster (benchmarks/train_step.py times a training step with and without it). The forward pass and the input
gradient stay oneDNN's; the result equals the reference gradient up to fp32 summation order
(tests/test_models.py checks it).

`SmallMapConv2d` is an `nn.Conv2d` (same parameters, same state-dict keys) that takes this path only while
training in fp32 on a CPU with tiny output maps; everything else (eval, export, CUDA, autocast) is plain Conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 4  # output positions (H*W) up to which the single-GEMM weight gradient is the faster one


class _SmallMapConv(torch.autograd.Function):
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
            cols = F.unfold(x, (kh, kw), padding=ctx.padding, stride=ctx.stride)  # N x (C*kh*kw) x L
            per_position = grad_out.reshape(grad_out.shape[0], out_c, -1)  # N x O x L
            # sum over images and positions at once: (O x N*L) @ (N*L x C*kh*kw)
            grad_w = (per_position.transpose(0, 1).reshape(out_c, -1)
                      @ cols.transpose(0, 1).reshape(in_c * kh * kw, -1).t()).reshape(weight.shape)
        return grad_x, grad_w, None, None


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d whose CPU fp32 training step uses `_SmallMapConv` where its output maps are tiny."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled() \
                and not torch.is_autocast_enabled("cpu") and self._output_positions(x) <= SMALL_MAP:
            return _SmallMapConv.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)

    def _output_positions(self, x: torch.Tensor) -> int:
        h, w = ((x.shape[-2 + i] + 2 * self.padding[i] - self.kernel_size[i]) // self.stride[i] + 1 for i in (0, 1))
        return h * w


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
