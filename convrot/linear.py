"""The quantized linear layer: a drop-in for nn.Linear holding ConvRot-rotated int4 (or int8) weights."""
from __future__ import annotations

import torch
from torch import nn

from . import ops, reference
from .hadamard import check_group_size


class ConvRotLinear(nn.Module):
    """y = dequant(int GEMM(quant(rotate(x)), W_q)) + bias, in x's dtype.

    Buffers use the checkpoint's names and layouts (`weight` int8 packed [out, in/2] for 4 bit or [out, in] for
    8 bit, `weight_scale` fp32 [out], `bias`), so `state_dict()` is already the on-disk format and `.to(device)`
    moves packed bytes, never a dequantized copy.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 256,
                 bits: int = 4, device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        check_group_size(group_size)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.bits = group_size, bits
        packed_k = in_features // 2 if bits == 4 else in_features
        self.register_buffer("weight", torch.zeros(out_features, packed_k, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 256,
                   bits: int = 4) -> "ConvRotLinear":
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, group_size, bits, device=weight.device,
                bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
        q, s = ops.quantize_weight(weight, group_size, bits)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        if bias is not None:
            m.bias.copy_(bias)
        return m

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                       group_size: int, bits: int = 4) -> "ConvRotLinear":
        out_f = weight.shape[0]
        in_f = weight.shape[1] * (2 if bits == 4 else 1)
        if weight.dtype != torch.int8 or weight_scale.numel() != out_f:
            raise ValueError(f"quantized weight must be int8 [out, in{'/2' if bits == 4 else ''}] with "
                             f"{out_f} scales; got {weight.dtype} {tuple(weight.shape)} and "
                             f"{weight_scale.numel()} scales")
        m = cls(in_f, out_f, bias is not None, group_size, bits, device="meta")
        m.weight = weight
        m.weight_scale = weight_scale.reshape(out_f).to(torch.float32)
        m.bias = bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.qlinear(x, self.weight, self.weight_scale, self.bias, self.group_size, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return reference.dequantize_weight(self.weight, self.weight_scale, self.group_size, self.bits, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"w{self.bits}a{self.bits}, group_size={self.group_size}")
