"""Low-rank (LoRA) branches folded into the W4A4 integer GEMM by extending K.

y = W4A4(x) + (x·Dᵀ)·Uᵀ costs, done as a separate update, two extra passes over the [M, N] output per layer (read and
write y), ~17% of a FLUX step for a rank-32 LoRA on every layer. Here the branch rides in the GEMM instead:

    a = [4·codes(x) | p]   (int8 [M, K+R]),   w = [16·codes(W) | q]   (int8 [N, K+R]),   epilogue scale w_scale/64

Multiplying the 4-bit codes by 4 and 16 (still inside int8) makes one accumulator unit 1/64 of a 4-bit product
step, fine enough for the appended low-rank products:
    q[n, r] = round(U[n, r] / w_scale[n] · c[r])        with c[r] = 127 / maxₙ |U[n, r] / w_scale[n]|   (once per LoRA)
    p[m, r] = round(h[m, r] · 64 / (c[r] · a_scale[m]))  with h = x·Dᵀ, clamped to ±127                   (per call)
so a_scale[m]·w_scale[n]/64·Σᵣ p·q = Σᵣ h[m, r]·U[n, r] up to ~1/64 of a 4-bit step per rank (far below the W4A4
error itself). p clamps only when one rank's term exceeds ~250 4-bit steps (a LoRA several times larger than the
layer's own output); the kernel counts clamps so callers can switch that layer to the exact branch (nodes/lora.py).

`prepare` builds the static part; `reference_linear` defines the arithmetic on any device (CPU tests); `linear`
runs it with the CUDA kernels (sm_90 route only: the s4 route of sm_80/86/89 reads packed codes and keeps the
separate update).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import reference

A_MUL, W_MUL = 4, 16      # code multipliers of the activation and weight sides (kernel: shift by 2 and 4 bits)
UNIT = A_MUL * W_MUL      # accumulator units per 4-bit product step
R_ALIGN = 64              # K + R must stay a multiple of 64 for the GEMM
MAX_R = 256


@dataclass
class LowRankCodes:
    """The static half of the folded branch for one layer on one device."""
    down: torch.Tensor         # [R, K] in the activation dtype (rows past the real rank are zero)
    q: torch.Tensor            # [N, R] int8
    pmul: torch.Tensor         # [R] fp32: 64 / c[r]
    w_scale: torch.Tensor      # [N] fp32: the layer's weight scale / 64
    clamped: torch.Tensor      # [1] int32 counter the kernel adds clamped p codes to
    rank: int                  # the real rank (before padding)


def padded_rank(rank: int) -> int:
    return -(-rank // R_ALIGN) * R_ALIGN


def prepare(down: torch.Tensor, up: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> LowRankCodes | None:
    """down [r, K], up [N, r] (strength and alpha already in `up`), the layer's weight scale [N]; None if r > 256."""
    r, k = down.shape
    n = up.shape[0]
    rp = padded_rank(r)
    if rp > MAX_R:
        return None
    dev = down.device
    u = torch.zeros(n, rp, device=dev, dtype=torch.float32)
    u[:, :r] = up.to(torch.float32) / w_scale.to(device=dev, dtype=torch.float32).reshape(n, 1)
    umax = u.abs().amax(0)
    c = torch.where(umax > 0, 127.0 / umax.clamp_min(1e-30), torch.ones_like(umax))
    q = torch.round(u * c).clamp_(-127, 127).to(torch.int8)
    d = torch.zeros(rp, k, device=dev, dtype=dtype)
    d[:r] = down.to(dtype)
    return LowRankCodes(d.contiguous(), q.contiguous(), (UNIT / c).contiguous(),
                        (w_scale.to(device=dev, dtype=torch.float32).reshape(n) / UNIT).contiguous(),
                        torch.zeros(1, device=dev, dtype=torch.int32), r)


def act_tail(h: torch.Tensor, a_scale: torch.Tensor, pmul: torch.Tensor) -> tuple[torch.Tensor, int]:
    """p codes [M, R] int8 from h [M, R] and the per-token scale, and how many were clamped."""
    p = torch.round(h.to(torch.float32) * pmul * (1.0 / a_scale.to(torch.float32)).unsqueeze(1))
    clamped = int((p.abs() > 127).sum())
    return p.clamp_(-127, 127).to(torch.int8), clamped


def reference_linear(x: torch.Tensor, w_packed: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                     codes: LowRankCodes) -> torch.Tensor:
    """The folded W4A4 + LoRA linear in plain PyTorch (exact integer GEMM), output in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a_packed, a_scale = reference.rotate_quantize(x2, group_size)
    h = (x2 @ codes.down.t()).to(x.dtype)  # the kernel path takes h in the activation dtype too
    p, n_clamped = act_tail(h, a_scale, codes.pmul)
    codes.clamped += n_clamped
    a = torch.cat([reference.unpack_int4(a_packed) * A_MUL, p], 1)
    w = torch.cat([reference.unpack_int4(w_packed) * W_MUL, codes.q], 1)
    acc = reference.int_matmul(a, w).to(torch.float32)
    out = acc * a_scale.unsqueeze(1) * codes.w_scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype).reshape(*lead, w_packed.shape[0])


def linear(x2d: torch.Tensor, w_packed: torch.Tensor, bias: torch.Tensor | None, group_size: int,
           codes: LowRankCodes) -> torch.Tensor:
    """The same with the CUDA kernels: x2d contiguous bf16/fp16 [M, K] on the GPU, sm_90 build."""
    from . import kernels
    return kernels.w4a4_lowrank_linear(x2d, w_packed, bias, group_size, codes)


def kernels_can_fold(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `linear` runs on this device and activation dtype (the CUDA-extension route, built for sm_90;
    bf16/fp16)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if os.environ.get("CONVROT_FOLD_LORA", "1") == "0":  # escape hatch / A-B measurements: the separate branch
        return False
    try:
        from . import kernels, routes
        return routes.route_for(device).name == "cuda" and kernels.can_fold_lowrank()
    except Exception:
        return False
