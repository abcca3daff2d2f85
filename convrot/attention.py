"""SageAttention-style quantized attention: the PyTorch reference (the definition the Triton kernel is held to).

q, k, v [B, H, L, D] (FLUX's layout inside ComfyUI's attention, after RoPE) -> out [B, H, Lq, D] in q's dtype.

What is quantized is data, in one place (QAttnConfig; DEFAULT is what the node and kernel run):
- Q and K to INT8, one scale per `q_block` / `k_block` tokens of each head (absmax / 127, round half to even).
  Q is multiplied by sm_scale * log2(e) before it is quantized, so QKᵀ comes out in log2 units for exp2.
- K is smoothed first: its per-channel mean over the tokens is subtracted. q·(k_j - mu) = q·k_j - q·mu shifts
  every score of a query row by the same amount, so the softmax is unchanged in exact arithmetic, while FLUX's
  keys, which share a large per-channel offset, lose most of their range (finer int8 steps).
- QKᵀ on the codes is exact: |code| <= 127, D <= 256, so every partial sum is an integer below 2^24 and fp32 holds
  it (any summation order, TF32 included: the codes have 7 bits).
- Softmax in fp32, online over key blocks of `k_block` tokens as the kernel runs it (running max per block;
  emulated here in closed form, so P is rounded exactly where the kernel rounds it).
- P·V in FP8 e4m3 (`pv="fp8"`): P <= 1 is stored as P * 448 (e4m3's largest normal), V with its per-channel mean
  subtracted (added back after: the rows of P/l sum to one) and one scale per channel (absmax / 448). The row sum
  l is taken from the fp32 P. `pv="bf16"`: P and V in V's 16-bit dtype (bf16 for fp32 inputs). `pv="none"`: fp32.

Why FP8 for P·V by default: the two matmuls cost the same, so INT8 QKᵀ with a bf16 P·V can at best reach 1.33x of
bf16 attention; FP8 P·V (sm_89+ tensor cores, 2x bf16's rate) lifts that bound to 2x. Its rounding (3 mantissa bits,
<= 3.1% per element, unbiased) averages over the keys a query attends to; the measured output error against
exact attention is ~1-2% relative (tests/test_attention.py) and the testbed's image error is in the report.
GPUs before sm_89 have no FP8 tensor cores; the kernel runs bf16 P·V there (`for_device`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

INT8_MAX = 127.0
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
LOG2E = 1.4426950408889634
SCALE_FLOOR = 1e-10  # an all-zero block gets a tiny scale instead of a division by zero
PV_MODES = ("fp8", "bf16", "none")
HEAD_DIMS = (64, 128)  # what the kernel is built for (FLUX: 128)


@dataclass(frozen=True)
class QAttnConfig:
    q_block: int = 128  # Q tokens per INT8 scale (per head)
    k_block: int = 64   # K tokens per INT8 scale = the online-softmax block
    quant_qk: bool = True
    smooth_k: bool = True
    pv: str = "fp8"
    smooth_v: bool = True  # fp8 P·V only

    def __post_init__(self):
        if self.pv not in PV_MODES:
            raise ValueError(f"QAttnConfig.pv must be one of {PV_MODES}, got {self.pv!r}")
        for name in ("q_block", "k_block"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"QAttnConfig.{name} must be a power of two >= 16, got {b}")

    def describe(self) -> str:
        qk = (f"INT8 Q/K (per {self.q_block}/{self.k_block}-token block per head"
              f"{', K smoothed' if self.smooth_k else ''})" if self.quant_qk else "fp32 QKᵀ")
        pv = {"fp8": "FP8 e4m3 P·V" + (" (V smoothed)" if self.smooth_v else ""), "bf16": "16-bit P·V",
              "none": "fp32 P·V"}[self.pv]
        return f"{qk}, fp32 softmax, {pv}"


DEFAULT = QAttnConfig()
BF16_PV = replace(DEFAULT, pv="bf16")
# the quality tool's names for them (`mixed+qattn`, `bf16+qattn-bf16pv`, ...)
VARIANTS = {"qattn": DEFAULT, "qattn-bf16pv": BF16_PV}


def for_device(cfg: QAttnConfig, capability: tuple[int, int] | None) -> QAttnConfig:
    """cfg as it runs on a CUDA GPU of that compute capability: fp8 P·V needs sm_89+ (else bf16)."""
    if cfg.pv == "fp8" and capability is not None and tuple(capability) < (8, 9):
        return replace(cfg, pv="bf16")
    return cfg


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str = "quantized attention") -> None:
    """Clear errors for what neither the reference nor the kernel handles."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[2] != v.shape[2] or k.shape[3] != d \
            or v.shape[3] != d:
        raise ValueError(f"{where}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         "(same B, H and D; k and v the same length)")
    if k.shape[2] == 0:
        raise ValueError(f"{where}: no keys (k has length 0)")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"{where}: q, k, v must be floating point; got {q.dtype}, {k.dtype}, {v.dtype}")


def _pad_tokens(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = -x.shape[2] % block
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean over the tokens, fp32 [B, H, 1, D] (the same torch call the kernel's wrapper makes)."""
    return x.mean(dim=2, dtype=torch.float32, keepdim=True)


def quantize_blocks(x: torch.Tensor, block: int, mean: torch.Tensor | None = None, mult: float = 1.0):
    """x [B, H, L, D] -> (int8 codes [B, H, Lpad, D] with zero padding, fp32 scales [B, H, Lpad / block]).

    ((x - mean) * mult) per block of `block` tokens: scale = max(absmax, 1e-10) / 127, codes round half to even."""
    xf = x.to(torch.float32)
    if mean is not None:
        xf = xf - mean
    if mult != 1.0:
        xf = xf * mult
    xf = _pad_tokens(xf, block)
    b, h, lp, d = xf.shape
    blocks = xf.reshape(b, h, lp // block, block * d)
    scale = blocks.abs().amax(dim=-1).clamp_min(SCALE_FLOOR) / INT8_MAX
    codes = torch.round(blocks / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes.reshape(b, h, lp, d), scale


def quantize_v_fp8(v: torch.Tensor, smooth: bool):
    """v [B, H, L, D] -> (e4m3 codes [B, H, L, D], fp32 per-channel scale [B, H, D], fp32 mean [B, H, D] or None).

    scale = max(absmax over tokens of v - mean, 1e-10) / 448; the absmax comes from the channel's min and max
    (max |v_i - mu| = max(vmax - mu, mu - vmin), equal in fp32 too since rounding is monotonic)."""
    mu = token_mean(v) if smooth else None
    vmin, vmax = torch.aminmax(v, dim=2, keepdim=True)
    vmin, vmax = vmin.to(torch.float32), vmax.to(torch.float32)
    amax = torch.maximum(vmax - mu, mu - vmin) if smooth else torch.maximum(vmax.abs(), vmin.abs())
    scale = amax.clamp_min(SCALE_FLOOR) / FP8_MAX
    vf = v.to(torch.float32)
    if smooth:
        vf = vf - mu
    codes = (vf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale.squeeze(2), None if mu is None else mu.squeeze(2)


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: QAttnConfig = DEFAULT,
                        sm_scale: float | None = None, chunk_elems: int = 2**27) -> torch.Tensor:
    """The quantized attention of `cfg` in torch ops; [B, H, Lq, D] in q's dtype (any device, any float dtype).

    Bounded memory: the (B·H) heads are done in chunks of about `chunk_elems` score entries."""
    check_inputs(q, k, v, "reference_attention")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    sm = default_scale(d) if sm_scale is None else float(sm_scale)
    mult = sm * LOG2E
    kb = cfg.k_block
    if cfg.quant_qk:
        qc, qs = quantize_blocks(q, cfg.q_block, mult=mult)
        kc, ks = quantize_blocks(k, kb, token_mean(k) if cfg.smooth_k else None)
        qf = qc.to(torch.float32)
        kf = kc.to(torch.float32)
    else:
        qf = _pad_tokens(q.to(torch.float32) * mult, cfg.q_block)
        kf = k.to(torch.float32)
        if cfg.smooth_k:
            kf = kf - token_mean(k)
        kf = _pad_tokens(kf, kb)
    lkp = kf.shape[2]
    nkb = lkp // kb
    if cfg.pv == "fp8":
        vc, vs, vmu = quantize_v_fp8(v, cfg.smooth_v)
        vf = _pad_tokens(vc.to(torch.float32), kb)
    elif cfg.pv == "bf16":
        low = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        vf = _pad_tokens(v.to(low).to(torch.float32), kb)
    else:
        vf = _pad_tokens(v.to(torch.float32), kb)
    out = torch.empty((b, h, lq, d), dtype=torch.float32, device=q.device)
    bh = b * h
    qf, kf, vf = (t.reshape(bh, t.shape[2], d) for t in (qf, kf, vf))
    step = max(1, chunk_elems // max(1, qf.shape[1] * lkp))
    valid = torch.arange(lkp, device=q.device) < lk
    for s in range(0, bh, step):
        e = min(bh, s + step)
        scores = qf[s:e] @ kf[s:e].transpose(1, 2)  # exact integers when quantized
        if cfg.quant_qk:
            # the kernel's order: (acc * q_scale) * k_scale
            qsc = qs.reshape(bh, -1)[s:e].repeat_interleave(cfg.q_block, dim=1)
            ksc = ks.reshape(bh, -1)[s:e].repeat_interleave(kb, dim=1)
            scores = scores * qsc.unsqueeze(-1) * ksc.unsqueeze(1)
        scores = scores[:, :lq].masked_fill(~valid, float("-inf"))
        n = e - s
        # online softmax over key blocks: running max after each block, P relative to it, rescaled at the end
        run = scores.reshape(n, lq, nkb, kb).amax(-1).cummax(-1).values  # [n, lq, nkb]
        m = run[..., -1:]
        p = torch.exp2(scores.reshape(n, lq, nkb, kb) - run.unsqueeze(-1))
        rescale = torch.exp2(run - m).unsqueeze(-1)  # the product of the kernel's per-block alphas
        l_row = (p.sum(-1, keepdim=True) * rescale).sum(-2)  # [n, lq, 1], from the fp32 P
        if cfg.pv == "fp8":
            pq = (p * FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
        elif cfg.pv == "bf16":
            pq = p.to(low).to(torch.float32)
        else:
            pq = p
        acc = (pq * rescale).reshape(n, lq, lkp) @ vf[s:e]
        o = acc / l_row
        if cfg.pv == "fp8":
            o = o * (vs.reshape(bh, 1, d)[s:e] / FP8_MAX)
            if vmu is not None:
                o = o + vmu.reshape(bh, 1, d)[s:e]
        out.view(bh, lq, d)[s:e] = o
    return out.to(q.dtype)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """Softmax attention in float64 (the yardstick of the tests), [B, H, Lq, D] float64."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    sm = default_scale(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return torch.softmax((q @ k.transpose(-1, -2)) * sm, dim=-1) @ v
