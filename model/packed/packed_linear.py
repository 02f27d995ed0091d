"""PackedBitLinear: BitLinear158's inference forward on packed ternary weights.

Source: Ma et al., "The Era of 1-bit LLMs" (2024) and BitNet b1.58's inference recipe (int8
activations times ternary weights in integer arithmetic, one rescale at the end), as bitnet.cpp
runs it. With the quantisers of `model.bitlinear` (the training forward's own functions):

    x_n  = rms_norm(x)                                   # non-affine, in x's dtype
    s_x  = activation_scale(x_n)                         # per token, (..., 1)
    x_i  = clamp(round(x_n * s_x), -128, 127)            # int8
    y    = (x_i @ codes^T) / (s_x * s_w)                 # exact int32 dot, one float rescale

The training forward computes linear(x_i / s_x, codes / s_w): the same function, so logits of a
packed model equal the unpacked model's to float rounding (tests/test_packed_model.py).

Weights live as 2-bit rows (`model.packed.packing`, uint8 (out, Kp / 4)) in a non-persistent buffer (it
follows `.to(device)` and is never cast by `.to(dtype)`); s_w is a Python float taken from the
float32 scale. Packed folders are written by `model.packed.packed_checkpoint`, not by `state_dict()`.
Inference only: there is no gradient through the integer path.
"""

from __future__ import annotations

import torch
from torch import nn

from model.bitlinear import BitLinear158, ternary_codes
from model.packed.kernels import BACKENDS, packed_linear_forward, packed_linear_unnormed, resolve_backend
from model.packed.packing import BLOCK, PackedTernary, pack_2bit, packed_shape, unpack


class PackedBitLinear(nn.Module):
    """Ternary linear (no bias) reading 2-bit packed codes; `backend` is "auto", "cpu", "triton" or "reference"."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5, backend: str = "auto",
                 device: torch.device | str | None = None, bias: bool = False, input_norm: bool = True):
        """An empty layer: its codes are set by `load_codes` / `load_packed` (or `from_bitlinear`).

        bias and input_norm as in BitLinear158: a full-precision bias (a regular, saved parameter) added
        after the ternary product; whether the layer RMS-normalises its own input.
        """
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.backend = backend
        self.input_norm = input_norm
        shape = packed_shape((out_features, in_features), "2bit")  # (out, Kp / 4)
        self.register_buffer("weight_packed", torch.empty(shape, dtype=torch.uint8, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.scale = 1.0  # s_w; w_q = codes / s_w

    @classmethod
    def like(cls, layer: BitLinear158, backend: str = "auto", device=None) -> "PackedBitLinear":
        """An empty packed layer of `layer`'s shape, bias and input norm."""
        return cls(layer.in_features, layer.out_features, layer.eps, backend, device=device,
                   bias=layer.bias is not None, input_norm=layer.input_norm)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear158, backend: str = "auto") -> "PackedBitLinear":
        """Quantise a trained layer's latent weight with the training quantiser and pack it."""
        packed = cls.like(layer, backend, device=layer.weight.device)
        codes, s_w = ternary_codes(layer.weight.detach())
        packed.load_codes(codes, s_w)
        if layer.bias is not None:
            packed.bias.data = layer.bias.detach().clone()
        return packed

    @torch.no_grad()
    def load_codes(self, codes: torch.Tensor, s_w: torch.Tensor | float) -> None:
        """Set the weights from int8 codes (out, in) and the scale s_w."""
        expected = (self.out_features, self.in_features)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit a PackedBitLinear {expected}")
        self.load_packed(pack_2bit(codes), s_w)

    @torch.no_grad()
    def load_packed(self, packed: PackedTernary, s_w: torch.Tensor | float) -> None:
        """Set the weights from packed codes in the runtime 2-bit layout and the scale s_w."""
        expected = (self.out_features, self.in_features)
        if packed.format != "2bit" or tuple(packed.shape) != expected:
            raise ValueError(f"need 2-bit codes of shape {expected}, got {packed.format} {packed.shape}")
        self.weight_packed = packed.data.to(self.weight_packed.device).contiguous()
        self.scale = float(torch.as_tensor(s_w, dtype=torch.float32))  # float32 value, kept exactly

    def packed(self) -> PackedTernary:
        return PackedTernary(self.weight_packed.cpu(), (self.out_features, self.in_features), "2bit")

    def codes(self) -> torch.Tensor:
        """int8 codes (out, in) in {-1, 0, 1}."""
        return unpack(self.packed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        lead = x.shape[:-1]
        backend = resolve_backend(x.device, self.backend)
        x2 = x.reshape(-1, self.in_features)
        if self.input_norm:
            y = packed_linear_forward(x2, self.eps, self.weight_packed, self.scale, backend)
        else:  # the model's own norms came before (SubLN): quantise the input as it is
            y = packed_linear_unnormed(x2, self.weight_packed, self.scale, backend)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)  # (M, out) -> (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, eps={self.eps}, "
                f"bias={self.bias is not None}, input_norm={self.input_norm}, bits=2, block={BLOCK}, "
                f"backend={self.backend}")


@torch.no_grad()
def pack_bitlinears(model: nn.Module, backend: str = "auto") -> int:
    """Swap every BitLinear158 of `model` for a PackedBitLinear (in place); returns how many were swapped."""
    names = [n for n, m in model.named_modules() if isinstance(m, BitLinear158)]
    for name in names:
        model.set_submodule(name, PackedBitLinear.from_bitlinear(model.get_submodule(name), backend))
    return len(names)


def set_backend(model: nn.Module, backend: str) -> None:
    """Choose the kernel backend of every PackedBitLinear of `model` ("auto" picks by device)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {list(BACKENDS)}")
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            module.backend = backend
