"""The "dequant" route: ConvRot's stored codes, dense cuBLAS math, for CUDA GPUs where no ConvRot kernel runs.

There (no CUDA extension built, Triton unavailable) the reference's emulated integer GEMM ran `mixed` at 0.09-0.12x
of bf16 on an H200. Here each call expands the layer's codes to the compute dtype and runs one F.linear: `mixed`
(12B FLUX, random weights, 1024², one forward in process, H200) ran at 0.71x of bf16 eager and at 0.90x of bf16
with both under Compile Blocks, where the expansion fuses into one kernel; the weights stay stored as int4/int8
codes (the memory saving is kept, the 4-bit speed-up is not). Activations are not quantized: this is weight-only
quantization (W4A16 / W8A16), so its result is closer to the unquantized model than the W4A4 / W8A8 reference's
(that forward: 0.045 relative error against bf16, the reference 0.063), and not equal to the reference's
(CONVROT_ROUTE=reference gives that math).

8-bit layers take this path too rather than cuBLAS int8 (torch._int_mm, which the reference route uses on CUDA):
with the activations rotated and quantized in torch ops around it, that was 2.3-3.8x slower than this at 4096
tokens and slower at every size measured under torch.compile; it won only eagerly at a single token (the
modulation layers: 188 against 334 µs).

Torch ops only, in x's dtype, so torch.compile traces it whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .hadamard import SUPPORTED_GROUP_SIZES, regular_hadamard


def supports_shape(k: int, n: int | None = None, group_size: int = 256) -> bool:
    return group_size in SUPPORTED_GROUP_SIZES and k > 0 and k % group_size == 0


def rotate_quantize(x2d: torch.Tensor, group_size: int):
    # activation quantization is no part of this route; other callers (weight quantization at load) get the reference
    return reference.rotate_quantize(x2d, group_size, 4)


def rotate_quantize_q8(x2d: torch.Tensor, group_size: int):
    return reference.rotate_quantize(x2d, group_size, 8)


def linear(x2d: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
           group_size: int, bits: int) -> torch.Tensor:
    """y = x·Ŵᵀ + bias in x's dtype, Ŵ the layer's dequantized weight in the original basis; x2d [M, K].

    The codes hold W·H per group of G channels (H orthogonal and symmetric), so x·Ŵᵀ = (x·H)·(codes·scale)ᵀ. The
    rotation is applied to x rather than undone on the weight: the weight's side then stays one elementwise op, and
    rotating x costs M·K·G against N·K·G, with FLUX's M (tokens) at most about N. On an H200, per layer either
    won by up to 15% eagerly depending on the shape, and compiled this was up to 3x faster (512 tokens); the
    whole `mixed` forward was 2% faster eager and 6% faster compiled than unrotating the weight.

    x is rotated by H/√G and the weight takes the √G: H/√G's entries are ±1/G, so a rotated value is at most its
    group's largest |x| and fp16 activations that F.linear takes cannot overflow here (x·H can grow by √G). Powers
    of two, so both scalings are exact.
    """
    dtype = x2d.dtype
    root = group_size ** 0.5
    h = regular_hadamard(group_size, x2d.device, dtype) * (1.0 / root)
    xr = (x2d.reshape(-1, group_size) @ h).reshape(x2d.shape)
    # int8 codes times a `dtype` scale: one kernel, promoted to `dtype` (codes are exact there)
    w = reference.codes_of(w_q, bits) * (w_scale.to(torch.float32) * root).to(dtype).unsqueeze(-1)
    return F.linear(xr, w, None if bias is None else bias.to(dtype))


def linear_fn(group_size: int, bits: int):
    def f(x, w, w_scale, bias):
        return linear(x, w, w_scale, bias, group_size, bits)
    return f


def w4a4_linear(x2d, w, w_scale, bias, group_size):
    """The backend API's name for a 4-bit layer's linear; here the activations stay in x's dtype (W4A16)."""
    return linear(x2d, w, w_scale, bias, group_size, 4)


def w8a8_linear(x2d, w, w_scale, bias, group_size):
    return linear(x2d, w, w_scale, bias, group_size, 8)
