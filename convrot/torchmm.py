"""The "torchmm" route: ConvRot's W4A4 / W8A8 integer math on PyTorch's own GEMMs, for CUDA GPUs where ConvRot's
extension is not built (no nvcc): no compiler, no Triton, torch ops only.

The codes are small integers (reference.QMAX: int4 codes in [-7, 7], int8 codes in [-127, 127]), so the layer's
product is an integer GEMM that the vendor library runs on int8 tensor cores: torch._int_mm (cuBLASLt, hipBLASLt
on ROCm), exact like the reference's emulated one. Around it:
- rotation: each group of G input channels times H_G in one tensor-core matmul with an fp32 result (torch.mm's
  out_dtype). H_G's entries are +-1/sqrt(G), powers of two, so every product of an fp16/bf16 activation with one is
  exact and only the fp32 accumulation rounds, as in the reference; its order differs, so a code can differ from
  the reference's where r / scale lies within an fp32 ulp of k + 1/2 (the CUDA and Triton kernels share that).
  fp32 inputs (weight quantization at load) take the reference's rotation;
- per-token quantization: the reference's formula (quantize below);
- epilogue: acc * a_scale[m] * w_scale[n] + bias[n] in fp32, cast to x's dtype once, the reference's order.
A packed int4 weight is unpacked to int8 codes on every call (a weight-sized pass); the stored layout stays packed.

GEMMS declares the two GEMMs this route can use. "int8" serves every layer. "fp8" (torch._scaled_mm, sm_89+) holds
the 4-bit codes exactly in e4m3 (every integer up to 16 is an e4m3 value; 176 of the 255 int8 codes are not, so
W8A8 never takes it) and applies the scales and the bias inside the GEMM, where _int_mm writes an int32 [M, N]
that the epilogue reads back. Its sums are exact while K * 7 * 7 < 2^24 (FLUX's largest K, 15360, gives 752,640)
and the GEMM accumulates in fp32; use_fast_accum=False asks cuBLAS/CUTLASS for that, which tests/test_torchmm.py
checks on the GPU. Neither GEMM has been timed in this route yet, so int8 is the default; CONVROT_TORCHMM_GEMM=fp8
asks for fp8 on 4-bit bf16 layers (bench/torchmm_bench.py times both against bf16).

Everything is traceable by torch.compile (Compile Blocks): no host syncs, branches on shapes, dtypes and devices
only. Eagerly the quantize and the epilogue are a few elementwise passes each (in place where they can be); under
Inductor each becomes one fused kernel around the library GEMMs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import reference
from .hadamard import SUPPORTED_GROUP_SIZES, regular_hadamard

GEMM_ENV = "CONVROT_TORCHMM_GEMM"
_HALF = (torch.float16, torch.bfloat16)
_FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Gemm:
    op: str                        # the torch op
    bits: tuple[int, ...]          # code widths its operand type holds exactly
    cuda_cc: tuple[int, int]       # the oldest NVIDIA compute capability it runs on
    rocm: bool                     # offered on ROCm devices (not measured there)
    out_dtypes: tuple              # output dtypes it serves
    min_m: int                     # fewer rows are padded with zero rows up to this
    kn_multiple: int               # K and N must be multiples of this
    epilogue: str                  # where the scales and the bias are applied


GEMMS = {
    # torch._int_mm's CUDA checks: M > 16, K and N positive multiples of 8 (aten/src/ATen/native/cuda/Blas.cpp);
    # cuBLASLt's int8 tensor-core GEMM needs Turing or newer
    "int8": Gemm("torch._int_mm", (4, 8), (7, 5), True, (torch.float16, torch.bfloat16, torch.float32), 17, 8,
                 "torch ops on the int32 result"),
    # _scaled_mm: K and N multiples of 16, sm_89/sm_9x+; row-wise scaling writes bf16 only below cuBLAS 12.9
    "fp8": Gemm("torch._scaled_mm", (4,), (8, 9), False, (torch.bfloat16,), 1, 16,
                "row-wise scales and bias inside the GEMM"),
}
DEFAULT_GEMM = "int8"  # fp8 becomes the default for 4-bit bf16 layers once it is measured faster on a GPU
# int32 accumulation of int8 codes stays exact up to this K
MAX_K = (2**31 - 1) // reference.QMAX[8] ** 2

_gemm_of: dict[str, str] = {}  # device -> the GEMM its probe accepted for 4-bit bf16 layers
_probed: dict[tuple, str | None] = {}


def supports_shape(k: int, n: int | None = None, group_size: int = 256) -> bool:
    m = GEMMS["int8"].kn_multiple
    ok = group_size in SUPPORTED_GROUP_SIZES and 0 < k <= MAX_K and k % group_size == 0 and k % m == 0
    return ok and (n is None or (n > 0 and n % m == 0))


def rotate(x2d: torch.Tensor, group_size: int) -> torch.Tensor:
    """reference.rotate in fp32; fp16/bf16 CUDA tensors on tensor cores (module docstring: why that is exact)."""
    if x2d.device.type == "cuda" and x2d.dtype in _HALF:
        h = regular_hadamard(group_size, x2d.device, x2d.dtype)
        return torch.mm(x2d.reshape(-1, group_size), h, out_dtype=torch.float32).view(x2d.shape)
    return reference.rotate(x2d, group_size)


def quantize(r: torch.Tensor, bits: int, code_dtype: torch.dtype = torch.int8):
    """reference.quantize_rows of an fp32 tensor this call may overwrite: (codes in code_dtype, fp32 scale).

    In place and with one min/max pass, so eagerly it reads r four times instead of the reference's seven; the
    values are the reference's (max(-min, max) is max |r|, and the 1e-10 floor is the reference's)."""
    qmax = reference.QMAX[bits]
    lo, hi = torch.aminmax(r, dim=-1)
    scale = torch.maximum(hi, -lo).clamp_min(reference.SCALE_FLOOR) / qmax
    codes = r.div_(scale.unsqueeze(-1)).round_().clamp_(-qmax, qmax).to(code_dtype)
    return codes, scale


def fp8_codes(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes as float8_e4m3fn, exactly (|code| <= 7). Through fp16: Triton has no int8 -> fp8 cast, so a
    compiled block that fuses the weight's unpack into this cast fails to build without the step between."""
    return codes.to(torch.float16).to(_FP8)


def rotate_quantize(x2d: torch.Tensor, group_size: int):
    codes, scale = quantize(rotate(x2d, group_size), 4)
    return reference.pack_int4(codes), scale


def rotate_quantize_q8(x2d: torch.Tensor, group_size: int):
    return quantize(rotate(x2d, group_size), 8)


def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ w [N, K]ᵀ for int8 codes, exact, int32. Fewer than GEMMS["int8"].min_m rows (one-token
    modulation layers) are padded with zero rows: cheaper than a second route for them, and no shape is refused."""
    m = a.shape[0]
    pad = GEMMS["int8"].min_m - m
    if pad > 0:
        a = torch.cat((a, a.new_zeros(pad, a.shape[1])))
    acc = torch._int_mm(a, w.t())
    return acc[:m] if pad > 0 else acc


def epilogue(acc, a_scale, w_scale, bias, out_dtype):
    """acc * a_scale[m] * w_scale[n] + bias[n] in fp32, in the reference's order (int32 * fp32 promotes exactly as
    acc.to(float32) does); in place after the first op, which saves passes over [M, N] eagerly."""
    out = acc * a_scale.to(torch.float32).unsqueeze(-1)
    out.mul_(w_scale.to(torch.float32))
    if bias is not None:
        out.add_(bias.to(torch.float32))
    return out.to(out_dtype)


def gemm_for(device: torch.device, dtype: torch.dtype, bits: int, k: int, n: int) -> str:
    """Which GEMMS entry a layer runs on: fp8 where its probe passed on this device (available()) and the layer
    fits it, else int8."""
    name = _gemm_of.get(_key(device), DEFAULT_GEMM)
    g = GEMMS[name]
    if bits in g.bits and dtype in g.out_dtypes and k % g.kn_multiple == 0 and n % g.kn_multiple == 0:
        return name
    return "int8"


def linear(x2d: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
           group_size: int, bits: int, gemm: str = "int8") -> torch.Tensor:
    """reference.convrot_linear for a 2-D input [M, K], in x's dtype; `gemm` names a GEMMS entry.

    w_q as stored: packed int4 [N, K/2] for bits=4, int8 codes [N, K] for bits=8."""
    dtype = x2d.dtype
    fp8 = gemm == "fp8"
    a, a_scale = quantize(rotate(x2d, group_size), bits, _FP8 if fp8 else torch.int8)
    w = reference.codes_of(w_q, bits)
    if fp8:
        return torch._scaled_mm(a, fp8_codes(w).t(), a_scale.unsqueeze(-1),
                                w_scale.to(torch.float32).unsqueeze(0),
                                bias=None if bias is None else bias.to(dtype), out_dtype=dtype, use_fast_accum=False)
    return epilogue(int_mm(a, w), a_scale, w_scale, bias, dtype)


def linear_fn(group_size: int, bits: int):
    def f(x, w, w_scale, bias):
        return linear(x, w, w_scale, bias, group_size, bits,
                      gemm_for(x.device, x.dtype, bits, x.shape[1], w_scale.shape[0]))
    return f


def w4a4_linear(x2d, w, w_scale, bias, group_size):
    return linear_fn(group_size, 4)(x2d, w, w_scale, bias)


def w8a8_linear(x2d, w, w_scale, bias, group_size):
    return linear(x2d, w, w_scale, bias, group_size, 8)


def _key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def available(device) -> tuple[bool, str]:
    """(ok, reason) for this route on `device` (never raises). The first call per device runs one tiny W4A4 and
    W8A8 linear against the reference (and the fp8 GEMM, when CONVROT_TORCHMM_GEMM=fp8 asks for it)."""
    try:
        dev = torch.device(device)
        if dev.type != "cuda":
            return False, f"{dev.type} tensors: this route runs PyTorch's CUDA GEMMs"
        if not torch.cuda.is_available():
            return False, "no GPU visible to PyTorch"
        dev = torch.device(_key(dev))
        props = torch.cuda.get_device_properties(dev)
        cc = (props.major, props.minor)
        if torch.version.hip:
            what = f"ROCm {getattr(props, 'gcnArchName', '?').split(':')[0]} ({props.name}; not measured)"
        else:
            what = f"sm_{cc[0]}{cc[1]} ({props.name})"
            if cc < GEMMS["int8"].cuda_cc:
                return False, f"{what} is older than sm_75, where cuBLAS has no int8 tensor-core GEMM"
        err = _probe_once(dev, "int8")
        if err is not None:
            return False, f"torch._int_mm probe failed on {what}: {err}"
        chosen, note = "int8", ""
        asked = os.environ.get(GEMM_ENV, "").strip().lower() or DEFAULT_GEMM
        if asked not in GEMMS:
            note = f"; {GEMM_ENV}={asked!r} is not one of {', '.join(GEMMS)}"
        elif asked == "fp8":
            g = GEMMS["fp8"]
            if (torch.version.hip and not g.rocm) or (not torch.version.hip and cc < g.cuda_cc):
                note = "; fp8 asked for, but it needs an NVIDIA GPU of sm_89 or newer"
            elif (err := _probe_once(dev, "fp8")) is not None:
                note = f"; fp8 probe failed ({err}), int8 for every layer"
            else:
                chosen, note = "fp8", "; fp8 (torch._scaled_mm) for 4-bit bf16 layers"
        _gemm_of[str(dev)] = chosen
        return True, f"torch._int_mm on {what}, torch {torch.__version__}{note}"
    except Exception as e:  # never raise into dispatch
        return False, f"torchmm availability check failed ({type(e).__name__}: {e})"


def _probe_once(dev: torch.device, gemm: str) -> str | None:
    key = (str(dev), gemm)
    if key not in _probed:
        _probed[key] = _probe(dev, gemm)
    return _probed[key]


def _probe(dev: torch.device, gemm: str) -> str | None:
    """One tiny linear per bit width (5 tokens: the padded case) against the reference on the CPU; None when fine.
    The tolerance allows a rounding tie's code to differ (module docstring)."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 64, generator=g)
        x[:, 3] *= 30
        x = x.to(torch.bfloat16)
        bias = torch.randn(16, generator=g).to(torch.bfloat16)
        for bits in GEMMS[gemm].bits:
            w_q, w_s = reference.rotate_quantize(torch.randn(16, 64, generator=g), 16, bits)
            want = reference.convrot_linear(x, w_q, w_s, bias, 16, bits).float()
            y = linear(x.to(dev), w_q.to(dev), w_s.to(dev), bias.to(dev), 16, bits, gemm).float().cpu()
            err = ((y - want).norm() / want.norm()).item()
            if not err < 2e-2:
                return f"W{bits}A{bits} result differs from the reference (relative error {err:.3g})"
        return None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first[:300]}"
