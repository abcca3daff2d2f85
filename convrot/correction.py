"""Calibration-free corrections of ConvRot weight quantization, computed from the weight alone while loading.

Two tools, both torch only, both optional and independent of the runtime kernels:

- **Scale search** (`search_scales`): per output row, the symmetric scale is `alpha * absmax / qmax` with alpha taken
  from a small grid (default 0.70 ... 1.00) to minimize that row's weight MSE ||r - s * round(r / s)||^2 in the
  rotated basis, instead of alpha = 1 (plain absmax). The codes and scale keep the engine's format (per-row fp32
  scale, codes clamped to +-qmax, round half to even), so any ConvRot kernel runs them unchanged.

- **Low-rank correction** (`quantize_with_correction`): a rank-r branch y += (x·Aᵀ)·Bᵀ (A [r, in], B [out, r], kept
  in the activation dtype) beside the W4A4 GEMM, like a LoRA, which the runtime already supports (and folds into the
  GEMM's K on Hopper, convrot/lowrank.py). Two ways to choose it:

  * ``mode="error"``: A, B = the top-r SVD of the weight's quantization error, W - dequant(codes). Removes the
    largest directions of the weight rounding error; the activation rounding error is untouched.
  * ``mode="weight"`` (default): the branch carries the top-r SVD of the weight itself, and only the residual
    W - B·A is rotated and quantized; then ``iters`` rounds of refitting the branch to W - dequant(codes) and
    re-quantizing the new residual. Both error sources shrink: the weight's rounding error (the residual's range is
    smaller) *and* the activation's (per-token int4 rounding of x is multiplied by the residual, not by W). This is
    the SVDQuant decomposition without its calibrated smoothing, so it needs nothing but the weight.

  Cost: r·(in + out) values in the branch's dtype per layer (bf16: 2 bytes each) and one [M, in] x [in, r] plus one
  [M, r] x [r, out] product per call (or r extra K-columns in a folded GEMM); an SVD per layer at load.

Nothing here needs activations or data. `apply_correction` rebuilds a ConvRotLinear-compatible module (the
reference / kernel path for the W4A4 part plus the branch), for tools and tests; the ComfyUI nodes do not use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import reference

DEFAULT_ALPHAS = tuple(round(0.70 + 0.02 * i, 2) for i in range(16))  # 0.70 ... 1.00

# `mixed+lr`, `compact+lr`: a preset with the correction on its W4A4 layers (the loader's preset names, the quality
# tool's variants); the rank and fit the testbed figures were measured with (docs/README_quality.md).
SUFFIX = "+lr"
DEFAULT_RANK = 32


def split_preset(name: str) -> tuple[str, int]:
    """("mixed", 32) for "mixed+lr", ("mixed", 0) for "mixed"."""
    if name.endswith(SUFFIX):
        return name[: -len(SUFFIX)], DEFAULT_RANK
    return name, 0


@dataclass
class CorrectedWeight:
    """Codes and scales in the engine's format plus an optional low-rank branch (both None when rank is 0)."""
    codes: torch.Tensor            # int8, packed [out, in/2] for 4 bits, [out, in] for 8 bits
    scale: torch.Tensor            # fp32 [out]
    down: torch.Tensor | None      # A [r, in]: h = x·Aᵀ
    up: torch.Tensor | None        # B [out, r]: y += h·Bᵀ
    group_size: int
    bits: int

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    def branch_values(self) -> int:
        """Values held by the branch: rank * (in + out)."""
        return 0 if self.down is None else self.down.numel() + self.up.numel()

    def dequantize(self) -> torch.Tensor:
        """The effective weight (fp32, original basis): dequantized codes plus the branch."""
        w = reference.dequantize_weight(self.codes, self.scale, self.group_size, self.bits)
        if self.down is not None:
            w = w + self.up.float() @ self.down.float()
        return w


def quantize_rows_searched(r: torch.Tensor, bits: int = 4, alphas=DEFAULT_ALPHAS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of r [N, K] (fp32) with the MSE-minimizing clip alpha per row.

    Returns (codes int8 [N, K], scale fp32 [N]), the same conventions as reference.quantize_rows (to which it
    reduces with alphas=(1.0,))."""
    qmax = reference.QMAX[bits]
    rf = r.to(torch.float32)
    amax = rf.abs().amax(dim=-1).clamp_min(reference.SCALE_FLOOR)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / qmax
    for a in alphas:
        s = amax * a / qmax
        q = torch.round(rf / s.unsqueeze(-1)).clamp_(-qmax, qmax)
        err = (q * s.unsqueeze(-1) - rf).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    codes = torch.round(rf / best_scale.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
    return codes, best_scale


def rotate_quantize_weight(weight: torch.Tensor, group_size: int, bits: int = 4,
                           scale_search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's offline weight quantization (reference.rotate_quantize), optionally with the scale search."""
    if not scale_search:
        return reference.rotate_quantize(weight, group_size, bits)
    codes, scale = quantize_rows_searched(reference.rotate(weight, group_size), bits)
    return (reference.pack_int4(codes) if bits == 4 else codes), scale


def search_scales(weight: torch.Tensor, group_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated, quantized weight with the per-row MSE scale search: (codes, scale) in the engine's format."""
    return rotate_quantize_weight(weight, group_size, bits, scale_search=True)


def _top_svd(m: torch.Tensor, rank: int, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """m [N, K] fp32 -> (up [N, r], down [r, K]), up @ down ~ the best rank-r approximation (balanced sqrt(S)).

    By default a seeded randomized SVD (torch.svd_lowrank, rank + 16 columns, 4 power iterations, fp32): within a
    fraction of a percent of the exact truncation on weight spectra and ~10x cheaper than a full SVD; exact=True
    takes the full fp64 SVD."""
    rank = min(rank, *m.shape)
    if exact or rank + 16 >= min(m.shape):
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        u, s, v = u[:, :rank].float(), s[:rank].float(), vh[:rank].t().float()
    else:
        # svd_lowrank draws from the global generator of m's device: seeded here, and the caller's state restored
        # (the loader runs this on the GPU, between the user's own seeded work)
        cuda = [m.device.index if m.device.index is not None else torch.cuda.current_device()] \
            if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(m.float(), q=rank + 16, niter=4)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.clamp_min(0).sqrt()
    return u * root, (v * root).t().contiguous()


def quantize_with_correction(weight: torch.Tensor, group_size: int, bits: int = 4, rank: int = DEFAULT_RANK,
                             mode: str = "weight", iters: int = 2, scale_search: bool = True,
                             branch_dtype: torch.dtype = torch.bfloat16) -> CorrectedWeight:
    """Rotated codes/scales of `weight` [out, in] plus a rank-`rank` branch (A, B); see the module docstring.

    mode "error": branch = top-r SVD of W - dequant(codes). mode "weight": branch = top-r SVD of W, codes of the
    residual, then `iters` refits of the branch to W - dequant(codes) with re-quantization. rank 0 gives plain codes
    (with or without the scale search). The branch is returned in `branch_dtype`; the fit uses the rounded branch,
    so the codes absorb its rounding."""
    if mode not in ("error", "weight"):
        raise ValueError(f"mode must be 'error' or 'weight', got {mode!r}")
    w = weight.to(torch.float32)
    if rank <= 0:
        codes, scale = rotate_quantize_weight(w, group_size, bits, scale_search)
        return CorrectedWeight(codes, scale, None, None, group_size, bits)

    def deq(c, s):
        return reference.dequantize_weight(c, s, group_size, bits)

    def rounded(up, down):
        return up.to(branch_dtype), down.to(branch_dtype)

    if mode == "error":
        codes, scale = rotate_quantize_weight(w, group_size, bits, scale_search)
        up, down = rounded(*_top_svd(w - deq(codes, scale), rank))
        return CorrectedWeight(codes, scale, down, up, group_size, bits)

    up, down = rounded(*_top_svd(w, rank))
    codes, scale = rotate_quantize_weight(w - up.float() @ down.float(), group_size, bits, scale_search)
    for _ in range(iters):
        up, down = rounded(*_top_svd(w - deq(codes, scale), rank))
        codes, scale = rotate_quantize_weight(w - up.float() @ down.float(), group_size, bits, scale_search)
    return CorrectedWeight(codes, scale, down, up, group_size, bits)


class CorrectedLinear(nn.Module):
    """A ConvRot quantized linear (any module computing the W4A4/W8A8 part: ConvRotLinear or a stand-in with the
    same arithmetic) plus the low-rank branch y += (x·Aᵀ)·Bᵀ computed in x's dtype, like an unfused LoRA."""

    def __init__(self, base: nn.Module, down: torch.Tensor | None, up: torch.Tensor | None):
        super().__init__()
        self.base = base
        self.register_buffer("down", down)
        self.register_buffer("up", up)
        self.in_features = getattr(base, "in_features", None)
        self.out_features = getattr(base, "out_features", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.down is None:
            return y
        h = x @ self.down.to(x.dtype).t()
        return y + (h @ self.up.to(x.dtype).t()).to(y.dtype)


def corrected_convrot_linear(weight: torch.Tensor, bias: torch.Tensor | None, group_size: int, bits: int = 4,
                             **kw) -> tuple[nn.Module, CorrectedWeight]:
    """A ConvRotLinear holding the corrected codes, wrapped with its branch; and the CorrectedWeight itself."""
    from .linear import ConvRotLinear
    cw = quantize_with_correction(weight, group_size, bits, **kw)
    base = ConvRotLinear.from_quantized(cw.codes.contiguous(), cw.scale, bias, group_size, bits)
    return CorrectedLinear(base, cw.down, cw.up), cw
