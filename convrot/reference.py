"""Pure-PyTorch reference ops. They define what every fast kernel must compute and run anywhere, CPU included.

Numerics (shared with ComfyUI's native `convrot_w4a4` format, so files are interchangeable):
- rotation: per group of G consecutive input channels, g -> g @ H_G, math in fp32 whatever the input dtype;
- symmetric quantization per row: scale = absmax / qmax (absmax clamped to 1e-10 so zero rows stay finite),
  code = round_half_even(r / scale) clamped to [-qmax, qmax]; qmax = 7 for int4, 127 for int8;
- int4 packing: two codes per byte, the low nibble holds the even input channel;
- GEMM: exact integer accumulation, then acc * a_scale[m] * w_scale[n] + bias[n] in fp32, cast to the output dtype
  once, at the very end: an fp16 output is inf only where the fp32 result itself exceeds fp16's range (65504), as
  with F.linear; intermediate products never round through the output dtype.

Non-finite inputs (NaN/inf in x) are not part of the contract, and the paths differ on them:
- the rotation spreads a NaN over its whole group of G channels; here torch's amax propagates it, so that token's
  scale and its whole output row are NaN;
- the CUDA kernels take the row maximum with fmaxf, which drops NaN: the scale comes from the other groups (or the
  1e-10 floor), the NaN values are clamped into the code range by the same fminf/fmaxf, and the output row is
  finite but wrong;
- an inf gives an inf scale on both paths, so that row's outputs are inf or NaN.
GPU and reference agree on finite inputs only; callers that must see NaN have to check x themselves.
"""
from __future__ import annotations

import torch

from .hadamard import check_group_size, regular_hadamard

QMAX = {4: 7, 8: 127}
# absmax floor of a quantization scale, so all-zero rows stay finite (the kernels use the same literal)
SCALE_FLOOR = 1e-10


def rotate(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Block-diagonal regular-Hadamard rotation along the last dim, returned in fp32.

    H is symmetric, so this single op serves activations (x @ H) and weights (W @ Hᵀ): x·Wᵀ is unchanged.
    """
    check_group_size(group_size)
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"last dim {k} is not a multiple of the ConvRot group size {group_size}")
    h = regular_hadamard(group_size, device=x.device)
    xg = x.to(torch.float32).reshape(*x.shape[:-1], k // group_size, group_size)
    return (xg @ h).reshape(x.shape)


def quantize_rows(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of the last dim: (codes int8, scale fp32 [...])."""
    qmax = QMAX[bits]
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1).clamp_min(SCALE_FLOOR) / qmax
    codes = torch.round(xf / scale.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
    return codes, scale


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] int codes in [-8, 7] -> [..., K/2] int8, low nibble = even k."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.int16)
    lo = c[..., 0::2] & 0xF
    hi = c[..., 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [..., K/2] int8 -> [..., K] int8 codes (signed nibbles).

    Arithmetic shifts of the signed byte sign-extend a nibble: >> 4 gives the high one, << 4 then >> 4 the low one.
    All in int8: the dequant route runs this per call, and the int16 round trip was 3-4x slower on an H200.
    """
    p = packed.view(torch.int8)  # a uint8 view would shift logically
    both = torch.stack(((p << 4) >> 4, p >> 4), dim=-1)
    return both.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def rotate_quantize(x: torch.Tensor, group_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate then quantize each row. bits=4 returns packed codes [..., K/2]; bits=8 plain codes [..., K]."""
    codes, scale = quantize_rows(rotate(x, group_size), bits)
    return (pack_int4(codes) if bits == 4 else codes), scale


def codes_of(q: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(q) if bits == 4 else q


def int_matmul(a: torch.Tensor, b: torch.Tensor, qmax: int = 128) -> torch.Tensor:
    """Exact a[M,K] @ b[N,K]ᵀ for integer codes of magnitude <= qmax, as int32 (the kernels' accumulator).

    fp32 sums of integers are exact while every partial sum stays below 2^24, and qmax² · K bounds them; so K is
    cut into chunks short enough for that (all of K for int4 codes, 1024 for int8), each chunk's product is exact
    in fp32 and the chunks are summed in int32. The split follows from the shape alone (no data-dependent branch,
    so torch.compile traces it), needs no float64 (MPS has none), and codes up to 2^11 are exact in TF32 too.
    """
    step = max(1, (2**24 - 1) // (qmax * qmax))
    af, bf = a.to(torch.float32), b.to(torch.float32)
    acc = None
    for s in range(0, max(a.shape[-1], 1), step):
        part = (af[:, s:s + step] @ bf[:, s:s + step].t()).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def quantized_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    bits: int = 4,
) -> torch.Tensor:
    """[M, K(/2)] x [N, K(/2)]ᵀ with exact integer accumulation and the scales/bias epilogue."""
    acc = int_matmul(codes_of(a_q, bits), codes_of(w_q, bits), 8 if bits == 4 else 128).to(torch.float32)
    out = acc * a_scale.to(torch.float32).unsqueeze(-1) * w_scale.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def convrot_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    bits: int = 4,
) -> torch.Tensor:
    """The whole quantized linear: rotate -> quantize per token -> integer GEMM -> scales -> bias; any leading dims."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    a_q, a_scale = rotate_quantize(x2d, group_size, bits)
    out = quantized_gemm(a_q, a_scale, w_q, w_scale, bias, x.dtype, bits)
    return out.reshape(*lead, w_scale.shape[0])


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor, group_size: int, bits: int = 4,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to the original basis: codes * scale, then the (self-inverse) rotation."""
    w_rot = codes_of(w_q, bits).to(torch.float32) * w_scale.to(torch.float32).unsqueeze(-1)
    return rotate(w_rot, group_size).to(dtype)
