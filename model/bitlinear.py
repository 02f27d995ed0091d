"""BitLinear158: the ternary linear layer of BitNet b1.58.

Source: Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (2024),
and the OLMo-Bitnet-1B training code (NousResearch), which this reproduces exactly:

    x_n = rms_norm(x)                                   # non-affine, no parameters (OLMo-Bitnet;
                                                        # BitNet 2B-4T's SubLN norms come before instead)
    s_x = 127 / max|x_n| per token                      # int8 absmax activations
    x_q = clamp(round(x_n * s_x), -128, 127) / s_x
    s_w = 1 / mean|W| per tensor                        # absmean ternary weights
    w_q = clamp(round(W * s_w), -1, 1) / s_w
    y   = linear(x_n + sg(x_q - x_n), W + sg(w_q - W))  # straight-through estimator

The quantisers are plain functions so that packing (`model.packed.packing`) uses the very same
arithmetic as training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_QMAX = 127.0
SCALE_FLOOR = 1e-5


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Non-affine RMSNorm computed in fp32 (as OLMo does), returned in the input dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 scale s_x = 127 / max|x|, shape (..., 1)."""
    return ACTIVATION_QMAX / x.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantise activations to int8 per token; returns dequantised values."""
    s_x = activation_scale(x)
    return (x * s_x).round().clamp(-128, 127) / s_x


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor absmean scale s_w = 1 / mean|W| (a 0-d tensor)."""
    return 1.0 / w.abs().mean().clamp(min=SCALE_FLOOR)


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes in {-1, 0, 1} (int8) and the per-tensor scale s_w, so that w_q = codes / s_w."""
    s_w = weight_scale(w)
    return (w * s_w).round().clamp(-1, 1).to(torch.int8), s_w


def quantize_weights(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantise weights to {-1, 0, 1} / s_w; returns dequantised values."""
    s_w = weight_scale(w)
    return (w * s_w).round().clamp(-1, 1) / s_w


class BitLinear158(nn.Module):
    """Linear layer with ternary weights and int8 activations.

    The parameter is the latent full-precision `weight` (out_features, in_features), plus a
    full-precision `bias` where the backbone has one (Qwen2's q/k/v; OLMo-Bitnet has none), added
    after the ternary product. `input_norm`: the layer normalises its own input with the non-affine
    RMSNorm above (OLMo-Bitnet); BitNet b1.58 2B-4T instead relies on the model's norms (SubLN) and
    quantises its input as it comes. Either way checkpoints hold the same tensors as a dense linear.
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5, bias: bool = False,
                 input_norm: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.input_norm = input_norm
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, eps: float = 1e-5, input_norm: bool = True) -> "BitLinear158":
        """The ternary layer over a dense linear's weight (and bias): same tensors, same names."""
        layer = cls(linear.in_features, linear.out_features, eps, linear.bias is not None, input_norm)
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        x_n = rms_norm(x, self.eps) if self.input_norm else x
        x_q = x_n + (quantize_activations(x_n) - x_n).detach()
        w = self.weight
        w_q = w + (quantize_weights(w) - w).detach()
        return F.linear(x_q, w_q, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, eps={self.eps}, "
                f"bias={self.bias is not None}, input_norm={self.input_norm}")
