"""Portable Triton kernels for ConvRot: rotate + quantize, W4A4 and W8A8 GEMMs. No compiler at install time.

Same meaning as convrot/reference.py (and the CUDA extension in convrot/kernels): the block-diagonal regular
Hadamard of group size G in fp32, symmetric per-token quantization (scale = max(absmax, 1e-10) / qmax, codes
round-half-even, clamped to +-qmax), int4 packing two codes per byte with the low nibble = even channel, exact
int32 accumulation, then acc * a_scale[m] * w_scale[n] + bias[n] in fp32, cast to the output dtype.

This module imports only torch at import time; triton is imported on first use, so the pack loads without it.

API
---
available(device=None, probe=True) -> (ok: bool, reason: str)
    Whether the Triton route can run on `device` (never raises). `reason` says why not (no triton, CPU tensor,
    GPU older than sm_80, untested ROCm arch, TRITON_INTERPRET set, a failed probe compile) or what runs.
    With probe=True the first call per device compiles and runs one tiny linear per bit width against a torch
    computation (a few seconds, once per process and device).
supports_shape(k, n=None, group_size=256, bits=4) -> bool
    The shape limits in LIMITS, for dispatch.
rotate_quantize(x2d, group_size, bits=4, *, packed=True, split=False, out=None, scale_out=None, rq=None)
        -> (codes, scale fp32 [M])
    bits=4: packed int8 [M, K/2] (packed=False: one int8 code per channel, [M, K], values in [-7, 7]);
    bits=8: int8 [M, K] in [-127, 127]. x2d: [M, K] fp16/bf16/fp32, last dim contiguous.
    split=True (bits=4, packed=False, K % 128 == 0): the int8 codes in the split chunk order that
    gemm(split=True) reads: in each chunk of SPLIT_CHUNK = 128 channels, the 64 even channels (0, 2, .., 126)
    first, then the 64 odd ones. Internal to the W4 GEMM routes; the default output is in channel order.
gemm(a, a_scale, w, w_scale, bias, out_dtype, *, k, out=None, split=False, swap=False, x16=False) -> y [M, N]
    Integer GEMM with the epilogue. `k` = number of codes per row; an operand whose last dim is k/2 is packed
    int4, one whose last dim is k is int8 codes (so W4A4 with int8 activation codes, packed or prepared weights,
    and W8A8 all go through here). split=True: a is split-order int8 codes, w packed int4, k % 128 == 0 (the
    "split" W4 GEMM); swap=True with it: the "split_swap" kernel; x16=True (packed w, no split): "packed_x16".
linear(x2d, w_q, w_scale, bias, group_size, bits=4, *, out=None, w4_gemm=None) -> y2d (x's dtype)
    The whole quantized linear: rotate + quantize (int8 codes) then gemm. w_q: bits=4 packed [N, K/2] or
    prepare_weight's int8 codes [N, K]; bits=8 int8 [N, K]. w4_gemm: see W4_GEMM (None = W4_GEMM).
linear_fn(group_size, bits, *, w4_gemm=None) -> f(x2d, w, w_scale, bias) -> y2d
    The contract of convrot.kernels.linear_fn: the caller has checked device and shape (x2d contiguous CUDA
    [M, K] fp16/bf16, w/w_scale as stored, bias None or [N]). w4_gemm is fixed when f is made.
linear_op() -> torch.ops.convrot_triton.linear.default(x2d, w, w_scale, bias, group_size, bits) -> y2d
    The same linear as one torch.library custom op with a fake (shape-only) kernel: opaque to torch.compile.
prepare_weight(w_packed) -> int8 codes [N, K]
    Optional: unpacks a W4 weight once (2x the packed bytes, half of bf16) so the GEMM skips the in-register
    sign extension; gemm / linear accept either form.
unpack_weight(w_packed, *, out=None) -> int8 codes [N, K]
    The same unpack as one Triton kernel launch (what W4_GEMM = "unpack" runs per call).

W4 GEMM route (W4_GEMM, env CONVROT_TRITON_W4, read at import; default "split_swap"), for bits=4 with a packed
weight only (prepared int8 weights and W8A8 always take the int8 x int8 GEMM):
    "split"       rotate+quantize writes the codes in the split chunk order; per 128 channels the GEMM does two
                  int8 dots, the weight's low nibbles against the even channels and the high nibbles against
                  the odd ones (no interleave in registers). Needs K % 128 == 0, else "packed_x16" runs.
    "split_swap"  the same, computing the transposed output tile (the unpacked weight is the dot's first
                  operand) and storing it transposed. Same K condition and fallback.
    "unpack"      a Triton kernel unpacks the weight into a scratch int8 [N, K] per call, then the int8 GEMM
                  (what the CUDA extension does); three launches instead of two, 2x the weight bytes read.
    "packed"      one GEMM that unpacks and re-interleaves the nibbles in registers.
    "packed_x16"  the same with the nibbles unpacked as 16x values (no sign extension; int32 sums shifted back
                  by 4, exact), which takes far fewer instructions than the sign extension.
Every route gives the same, bit-equal result. On NVIDIA the split and packed_x16 kernels unpack with inline PTX.

Rotate+quantize method (RQ, env CONVROT_TRITON_RQ, read at import; `rq=` per call; default "auto"):
    "dot"   two passes over each row block (absmax, then codes), the rotation as tensor-core dots with +-1 factors
    "fwht"  the same two passes, the rotation as sums over size-4 axes in registers (H_4 = J - 2P), no dots
    "row"   one pass: whole rows in registers, padded to a power of two or as three tiles of K / 3 (K = 3 * 2^n)
            (K <= ROW_MAX_K, else "fwht")
    "auto"  "row" where it needs no padding (K = 2^n or 3 * 2^n, K <= ROW_MAX_K), else "fwht", at every M
All give the reference's codes (up to rare rounding ties) and scales.

Limits (LIMITS, a TritonLimits): group_size in {16, 64, 256}; K % group_size == 0 and 0 < K <= 65536 (int32
accumulator exact for int8 codes up to K = 133,000); any N >= 1 (N % 8 recommended: cuBLAS/extension parity,
aligned stores); M >= 0; activations fp16/bf16 for linear (fp32 too for rotate_quantize, e.g. offline weight
quantization); codes int8; scales fp32 (others are converted); bias any float dtype, read as fp32; CUDA sm_80+
(Ampere, Ada, Hopper, Blackwell incl. sm_120) or ROCm CDNA2/3 (gfx90a/gfx942/gfx950, not measured).

Notes for dispatch: AUTOTUNE (env CONVROT_TRITON_AUTOTUNE, default on) picks per shape among a few block
configs; off, one fixed config is used (fewer compiles, slower GEMMs). With it on, the first call per (shape
bucket, dtype) compiles and benchmarks each config (seconds per new kernel variant, once per process; compiled
kernels are cached on disk by Triton), so warm up before CUDA-graph capture; afterwards a call is two kernel
launches (int8 activation codes between them; three with W4_GEMM = "unpack"). The
rotation sums in fp32 (the dot method: tensor-core matmuls with exact +-1 products, fp32 inputs split into
three bf16 pieces), and codes are rint(r * (1 / scale)) as in the CUDA extension, so codes equal the
reference's rint(r / scale) except near rounding ties (r / scale within ~2^-21 of k + 0.5); scales are the
reference's, bit for bit, up to the summation order.
Under TRITON_INTERPRET=1 (set before this module first imports triton) the same kernels run on CPU tensors in
Triton's interpreter: for tests only, far slower than the reference.
"""
from __future__ import annotations

import dataclasses
import os
import threading

import torch

from . import reference

__all__ = ["LIMITS", "TritonLimits", "available", "supports_shape", "rotate_quantize", "gemm", "linear",
           "linear_fn", "linear_op", "prepare_weight", "unpack_weight", "W4_GEMM", "W4_GEMMS", "SPLIT_CHUNK"]


@dataclasses.dataclass(frozen=True)
class TritonLimits:
    group_sizes: tuple = (16, 64, 256)
    bits: tuple = (4, 8)
    k_multiple_of_group: bool = True  # K % group_size == 0 (then K is even, as packing needs)
    max_k: int = 65536
    n_multiple: int = 1  # any N works (masked); 8 is what the other routes need
    min_cuda_cc: tuple = (8, 0)
    rocm_archs: tuple = ("gfx90a", "gfx942", "gfx950")
    linear_dtypes: tuple = (torch.float16, torch.bfloat16)
    rotate_dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32)
    gemm_out_dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32)


LIMITS = TritonLimits()

_QMAX = {4: 7, 8: 127}
_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_lock = threading.Lock()
_jit_mod = []
_h_cache: dict = {}
_avail_cache: dict = {}
# No multiply-add contraction in the GEMMs: the epilogue (acc * a_scale) * w_scale + bias then rounds like the
# reference's separate torch ops (bit-equal outputs). The rotate+quantize kernels keep it on: their products are
# exact (2 * z, powers of two) except r * (1 / scale), whose FMA with the rounding constant rounds once.
_NO_FUSION = {"enable_fp_fusion": False}
# False (or CONVROT_TRITON_AUTOTUNE=0): one fixed block config per kernel, no autotuning (fewer compiles; tests)
AUTOTUNE = os.environ.get("CONVROT_TRITON_AUTOTUNE", "1") not in ("0", "")
W4_GEMMS = ("split", "split_swap", "unpack", "packed", "packed_x16")
# the fastest on an H200 (bench/NOTES.md S21, again S22); checked where used, so a typo cannot break the import
W4_GEMM = os.environ.get("CONVROT_TRITON_W4", "split_swap")
SPLIT_CHUNK = 128  # the split activation order's chunk (the kernels read it from here)
RQ_KERNELS = ("dot", "fwht", "row")  # the rotate+quantize kernels
RQ_METHODS = ("auto",) + RQ_KERNELS
RQ = os.environ.get("CONVROT_TRITON_RQ", "auto")  # the rotate+quantize method; checked where used
ROW_MAX_K = 16384  # the "row" method holds whole rows in registers (row_tiles); above this, "fwht"
# "auto" is "row" wherever a row needs no padding, else fwht (bench/NOTES.md Session 12, S33, H200: the row kernel
# beat fwht and dot at every FLUX shape but K = 15360, which it pads to 16384)
# the block config used without autotuning (the interpreter, CONVROT_TRITON_AUTOTUNE=0, the probe)
_SPLIT_FIXED = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, ONE_DOT=True, num_warps=4)


def _jit():
    """The kernels module (imports triton). Raises ImportError without triton."""
    if not _jit_mod:
        with _lock:
            if not _jit_mod:
                from . import _triton_jit

                _jit_mod.append(_triton_jit)
    return _jit_mod[0]


def triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def supports_shape(k: int, n: int | None = None, group_size: int = 256, bits: int = 4) -> bool:
    """K, N, G and bits inside LIMITS."""
    ok = (group_size in LIMITS.group_sizes and bits in LIMITS.bits and 0 < k <= LIMITS.max_k
          and k % group_size == 0)
    return ok and (n is None or (n >= 1 and n % LIMITS.n_multiple == 0))


def _hadamard_pm1(size: int, device) -> torch.Tensor:
    """Unnormalized regular Hadamard (+-1, fp32) of order 16 or 64: the H4 Kronecker powers of hadamard.py."""
    key = (size, str(device))
    h = _h_cache.get(key)
    if h is None:
        h4 = torch.tensor(_H4, dtype=torch.float32)
        h = h4
        while h.shape[0] < size:
            h = torch.kron(h, h4)
        h = _h_cache[key] = h.to(device).contiguous()
    return h


def _m_bucket(m: int) -> int:
    b = 16
    while b < m and b < 16384:
        b *= 2
    return b


def _check_group(group_size: int, k: int) -> None:
    if group_size not in LIMITS.group_sizes:
        raise ValueError(f"group_size must be one of {LIMITS.group_sizes}, got {group_size}")
    if k % group_size or k <= 0 or k > LIMITS.max_k:
        raise ValueError(f"K={k} must be a positive multiple of group_size={group_size}, at most {LIMITS.max_k}")


def rotate_quantize(x2d: torch.Tensor, group_size: int, bits: int = 4, *, packed: bool = True, split: bool = False,
                    out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None, rq: str | None = None):
    """(codes, scale fp32 [M]) = reference.rotate_quantize(x2d, group_size, bits) (packed=False: unpacked int4;
    split=True with it: in the split chunk order, see the module docstring).

    `out` / `scale_out`, when given, are written in place (shape [M, K/2] or [M, K] int8, [M] fp32) and returned.
    """
    if x2d.dim() != 2:
        raise ValueError(f"expected a 2-D [M, K] tensor, got shape {tuple(x2d.shape)}")
    if x2d.dtype not in LIMITS.rotate_dtypes:
        raise ValueError(f"dtype must be one of {LIMITS.rotate_dtypes}, got {x2d.dtype}")
    if bits not in _QMAX:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    m, k = x2d.shape
    _check_group(group_size, k)
    if split and (bits != 4 or packed or k % SPLIT_CHUNK):
        raise ValueError(f"split=True needs bits=4, packed=False and K % {SPLIT_CHUNK} == 0 "
                         f"(got bits={bits}, packed={packed}, K={k})")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    pack = bits == 4 and packed
    cols = k // 2 if pack else k
    if out is None:
        out = torch.empty((m, cols), device=x2d.device, dtype=torch.int8)
    elif out.shape != (m, cols) or out.dtype != torch.int8 or out.stride(1) != 1:
        raise ValueError(f"out must be int8 [{m}, {cols}] with a contiguous last dim")
    if scale_out is None:
        scale_out = torch.empty((m,), device=x2d.device, dtype=torch.float32)
    elif scale_out.shape != (m,) or scale_out.dtype != torch.float32 or not scale_out.is_contiguous():
        raise ValueError(f"scale_out must be contiguous float32 [{m}]")
    if m == 0:
        return out, scale_out
    _launch_rotate_quantize(x2d, out, scale_out, group_size, _QMAX[bits], pack, split=split, rq=rq)
    return out, scale_out


def _check_rq(rq: str | None) -> str:
    """rq, or RQ for None, checked against RQ_METHODS."""
    method = RQ if rq is None else rq
    if method not in RQ_METHODS:
        raise ValueError(f"rotate+quantize method (CONVROT_TRITON_RQ) must be one of {RQ_METHODS}, got {method!r}")
    return method


def row_tiles(k: int, group_size: int) -> tuple[int, bool]:
    """The "row" kernel's register tiles for K: (KP, thirds). K = 3 * 2^n (3072, 12288) as three tiles of K / 3
    (no padding) where K / 3 is a multiple of the group size; else one tile of K padded to a power of two."""
    third = k // 3
    if k % 3 == 0 and third & (third - 1) == 0 and third % group_size == 0:
        return third, True
    return 1 << (k - 1).bit_length(), False


def _rq_method(rq: str | None, k: int, m: int = 1) -> str:
    """The rotate+quantize kernel that runs for an [M, K] input (see RQ). The methods sum in different orders, so a
    token's scale may differ in fp32's last bit between them (its codes only near a tie)."""
    method = _check_rq(rq)
    if method == "auto":
        method = "row" if _row_unpadded(k) else "fwht"
    return "fwht" if method == "row" and k > ROW_MAX_K else method


def _row_unpadded(k: int) -> bool:
    """Whether the row kernel holds K with no padding (K = 2^n, or 3 * 2^n as three tiles), judged at G = 256:
    K = 3 * 2^n below 768 counts as padded even where a smaller group would tile it (auto then runs fwht)."""
    kp, thirds = row_tiles(k, 256)
    return kp * (3 if thirds else 1) == k


def _launch_rotate_quantize(x2d, out, scale_out, group_size, qmax, pack, fixed=False, split=False, rq=None):
    """One launch of the rotate+quantize kernel; `fixed` (the interpreter, the probe) skips autotuning."""
    j = _jit()
    m, k = x2d.shape
    method = _rq_method(rq, k, m)
    tune = not (fixed or j.INTERPRET or not AUTOTUNE)
    # no _NO_FUSION here: contraction (Triton's default) changes no result of these kernels (see _NO_FUSION)
    common = dict(G=group_size, NORM=1.0 / (group_size ** 0.5), QMAX=qmax, PACK=pack, SPLIT=split)
    if method == "row":
        kp, thirds = row_tiles(k, group_size)
        args = (x2d, out, scale_out, m, k, x2d.stride(0), out.stride(0), _m_bucket(m))
        row = dict(common, KP=kp, THIRDS=thirds)
        if tune:
            j.rotate_quantize_row_tuned[lambda meta: (triton_cdiv(m, meta["BLOCK_M"]),)](*args, **row)
        else:
            # one row, 8 values of each tile per thread: a 256-group then lies in one warp (no shared memory)
            nw = min(16, max(4, kp // 256))
            j.rotate_quantize_row_kernel[(m,)](*args, **row, BLOCK_M=1, num_warps=nw)
        return
    hs = 64 if group_size == 64 else 16
    h = _hadamard_pm1(hs, x2d.device)
    args = (x2d, h, out, scale_out, m, k, x2d.stride(0), out.stride(0), _m_bucket(m))
    consts = dict(common, HS=hs, DOT_F32=j.INTERPRET)
    if not tune:
        # fwht: small row blocks, as its autotuned configs (32 x 256 in registers compiled to ~200 registers)
        bm, bk = (4, 512) if method == "fwht" else (32, 256)
        j.rotate_quantize_kernel[(triton_cdiv(m, bm),)](*args, **consts, BLOCK_M=bm, BLOCK_K=bk, num_warps=4,
                                                         FWHT=method == "fwht")
    else:
        kern = j.rotate_quantize_fwht_tuned if method == "fwht" else j.rotate_quantize_tuned
        kern[lambda meta: (triton_cdiv(m, meta["BLOCK_M"]),)](*args, **consts)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _operand_packed(t: torch.Tensor, k: int, name: str) -> bool:
    if t.dim() != 2 or t.dtype != torch.int8 or t.stride(1) != 1:
        raise ValueError(f"{name} must be a 2-D int8 tensor with a contiguous last dim")
    if t.shape[1] * 2 == k:
        return True
    if t.shape[1] == k:
        return False
    raise ValueError(f"{name} has {t.shape[1]} bytes per row; expected {k // 2} (packed int4) or {k} (int8 codes)")


def gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
         bias: torch.Tensor | None, out_dtype: torch.dtype, *, k: int, out: torch.Tensor | None = None,
         split: bool = False, swap: bool = False, x16: bool = False):
    """y[M, N] = (a_codes @ w_codesᵀ) * a_scale[m] * w_scale[n] + bias[n] (fp32 math), in out_dtype.

    k: codes per row. a [M, k/2 or k], w [N, k/2 or k]: last dim k/2 = packed int4, k = int8 codes.
    split=True: a is int8 codes [M, k] in the split chunk order (rotate_quantize(split=True)), w packed int4,
    k % SPLIT_CHUNK == 0; swap=True (with split only) picks the transposed-tile kernel. x16=True (packed w):
    the weight's nibbles unpacked as 16x values (the "packed_x16" route); same result.
    """
    if out_dtype not in LIMITS.gemm_out_dtypes:
        raise ValueError(f"out_dtype must be one of {LIMITS.gemm_out_dtypes}, got {out_dtype}")
    if k <= 0 or k % 2 or k > LIMITS.max_k:
        raise ValueError(f"k={k} must be even, positive and at most {LIMITS.max_k}")
    a_packed = _operand_packed(a, k, "a")
    w_packed = _operand_packed(w, k, "w")
    if swap and not split:
        raise ValueError("swap=True needs split=True")
    if x16 and (split or not w_packed):
        raise ValueError("x16=True needs a packed weight [N, k/2] and split=False")
    if split and (a_packed or not w_packed or k % SPLIT_CHUNK):
        raise ValueError(f"split=True needs int8 activation codes [M, k], a packed weight [N, k/2] and "
                         f"k % {SPLIT_CHUNK} == 0 (k={k})")
    m, n = a.shape[0], w.shape[0]
    if a_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(f"a_scale has {a_scale.numel()} entries for M={m}, w_scale {w_scale.numel()} for N={n}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias has {bias.numel()} entries for N={n}")
    if out is None:
        out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    elif out.shape != (m, n) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"out must be {out_dtype} [{m}, {n}] with a contiguous last dim")
    if m == 0 or n == 0:
        return out
    a_scale = a_scale.reshape(m).to(torch.float32).contiguous()
    w_scale = w_scale.reshape(n).to(torch.float32).contiguous()
    if bias is not None:
        bias = bias.reshape(n).contiguous()
    if split:
        _launch_gemm_split(a, a_scale, w, w_scale, bias, out, k, swap)
    else:
        _launch_gemm(a, a_scale, w, w_scale, bias, out, k, a_packed, w_packed, w_x16=x16)
    return out


def _asm(j) -> bool:
    """Inline PTX in the kernels: compiled for NVIDIA (not the interpreter, not ROCm)."""
    return not j.INTERPRET and torch.version.hip is None


def _launch_gemm(a, a_scale, w, w_scale, bias, out, k, a_packed, w_packed, fixed=False, w_x16=False):
    """One launch of the GEMM kernel (a_scale/w_scale fp32 contiguous, bias None or contiguous [N])."""
    j = _jit()
    m, n = a.shape[0], w.shape[0]
    args = (a, w, a_scale, w_scale, a_scale if bias is None else bias, out, m, n, k,
            a.stride(0), w.stride(0), out.stride(0), _m_bucket(m))
    consts = dict(A_PACKED=a_packed, W_PACKED=w_packed, HAS_BIAS=bias is not None, W_X16=w_x16 and w_packed,
                  ASM=_asm(j), BF16_RTNE=j.INTERPRET and out.dtype == torch.bfloat16)
    if fixed or j.INTERPRET or not AUTOTUNE:
        grid = (triton_cdiv(m, 32) * triton_cdiv(n, 64),)
        j.gemm_fixed[grid](*args, **consts, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4,
                           **({} if j.INTERPRET else _NO_FUSION))
    else:
        j.gemm_tuned[lambda meta: (triton_cdiv(m, meta["BLOCK_M"]) * triton_cdiv(n, meta["BLOCK_N"]),)](
            *args, **consts, **_NO_FUSION)


def _launch_gemm_split(a, a_scale, w, w_scale, bias, out, k, swap, fixed=False):
    """One launch of the split W4 GEMM: a split-order int8 codes [M, k], w packed [N, k/2], k % 128 == 0."""
    j = _jit()
    m, n = a.shape[0], w.shape[0]
    args = (a, w, a_scale, w_scale, a_scale if bias is None else bias, out, m, n, k,
            a.stride(0), w.stride(0), out.stride(0), _m_bucket(m))
    consts = dict(HAS_BIAS=bias is not None, SWAP=swap, ASM=_asm(j),
                  BF16_RTNE=j.INTERPRET and out.dtype == torch.bfloat16)
    if fixed or j.INTERPRET or not AUTOTUNE:
        cfg = _SPLIT_FIXED
        grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]),)
        j.gemm_split_kernel[grid](*args, **consts, **cfg, **({} if j.INTERPRET else _NO_FUSION))
    else:
        j.gemm_split_tuned[lambda meta: (triton_cdiv(m, meta["BLOCK_M"]) * triton_cdiv(n, meta["BLOCK_N"]),)](
            *args, **consts, **_NO_FUSION)


def _launch_unpack(w, out):
    """Packed int4 w [N, K/2] (last dim contiguous) -> int8 codes into out [N, K] (contiguous); K % 8 == 0."""
    j = _jit()
    n, kp = w.shape
    if w.stride(0) % 4 or w.storage_offset() % 4 or w.data_ptr() % 4:  # read as 32-bit words
        w = w.clone()
    bn, bw = 8, 256
    j.unpack_int4_kernel[(triton_cdiv(n, bn), triton_cdiv(kp // 4, bw))](
        w.view(torch.int32), out.view(torch.int64), n, kp // 4, w.stride(0) // 4, kp // 4,
        BLOCK_N=bn, BLOCK_W=bw, num_warps=4)


def prepare_weight(w_packed: torch.Tensor) -> torch.Tensor:
    """Packed int4 [N, K/2] -> int8 codes [N, K] (torch ops, once per weight)."""
    p = w_packed.view(torch.uint8).to(torch.int16)
    both = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(w_packed.shape[0], w_packed.shape[1] * 2)
    return torch.where(both >= 8, both - 16, both).to(torch.int8).contiguous()


def unpack_weight(w_packed: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed int4 [N, K/2] -> int8 codes [N, K] in channel order (= prepare_weight), one Triton launch; K % 8 == 0."""
    if w_packed.dim() != 2 or w_packed.dtype != torch.int8 or w_packed.stride(1) != 1:
        raise ValueError("w_packed must be a 2-D int8 tensor with a contiguous last dim")
    n, kp = w_packed.shape
    if kp % 4:
        raise ValueError(f"unpack_weight needs K % 8 == 0 (got {kp} bytes per row)")
    if out is None:
        out = torch.empty((n, 2 * kp), device=w_packed.device, dtype=torch.int8)
    elif out.shape != (n, 2 * kp) or out.dtype != torch.int8 or not out.is_contiguous() or out.data_ptr() % 8:
        raise ValueError(f"out must be contiguous, 8-byte aligned int8 [{n}, {2 * kp}] (written as 64-bit words)")
    if n and kp:
        _launch_unpack(w_packed, out)
    return out


def _w4_route(w4_gemm: str | None, k: int, w_packed: bool) -> str:
    """The W4 GEMM that runs for this weight form and K (see W4_GEMM); "int8" = the prepared-weight GEMM."""
    mode = W4_GEMM if w4_gemm is None else w4_gemm
    if mode not in W4_GEMMS:
        raise ValueError(f"W4 GEMM route (CONVROT_TRITON_W4) must be one of {W4_GEMMS}, got {mode!r}")
    if not w_packed:
        return "int8"
    if mode in ("split", "split_swap") and k % SPLIT_CHUNK:
        return "packed_x16"  # faster than "packed" at every FLUX shape on an H200 (bench/NOTES.md S21)
    return mode


def linear(x2d: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
           group_size: int, bits: int = 4, *, out: torch.Tensor | None = None,
           w4_gemm: str | None = None, rq: str | None = None) -> torch.Tensor:
    """reference.convrot_linear for a 2-D input: rotate + quantize x per token, integer GEMM, epilogue.

    Output dtype = x's (fp16/bf16). The activation codes go through memory as int8 (one byte per code) so the
    GEMM's A operand needs no unpacking; the weight may be packed [N, K/2] or prepared int8 [N, K].
    w4_gemm: the W4 GEMM route for a packed weight (None = W4_GEMM); rq: the rotate+quantize method (None = RQ).
    """
    if x2d.dtype not in LIMITS.linear_dtypes:
        raise ValueError(f"linear returns x's dtype, which must be float16 or bfloat16, got {x2d.dtype}")
    k = x2d.shape[-1]
    if bits == 8 and w_q.shape[-1] != k:
        raise ValueError(f"W8A8 weight has {w_q.shape[-1]} codes per row; expected K={k}")
    route = _w4_route(w4_gemm, k, w_q.dim() == 2 and w_q.shape[-1] * 2 == k) if bits == 4 else "int8"
    if route in ("split", "split_swap"):
        a, a_scale = rotate_quantize(x2d, group_size, 4, packed=False, split=True, rq=rq)
        return gemm(a, a_scale, w_q, w_scale, bias, x2d.dtype, k=k, out=out, split=True,
                    swap=route == "split_swap")
    if route == "unpack":
        w_q = unpack_weight(w_q)
    a, a_scale = rotate_quantize(x2d, group_size, bits, packed=False, rq=rq)
    return gemm(a, a_scale, w_q, w_scale, bias, x2d.dtype, k=k, out=out, x16=route == "packed_x16")


def linear_fn(group_size: int, bits: int, *, w4_gemm: str | None = None, rq: str | None = None,
              _fixed: bool = False):
    """f(x2d, w, w_scale, bias) -> y2d with convrot.kernels.linear_fn's contract (checks left to the caller).

    x2d contiguous [M, K] fp16/bf16 on a device where available() is True, K inside LIMITS for group_size;
    w packed [N, K/2] or int8 [N, K] (bits=8: int8 [N, K]); w_scale [N] (fp32 avoids a conversion);
    bias None or contiguous [N] (x's dtype avoids nothing: it is read as fp32 in any float dtype).
    w4_gemm: the W4 GEMM route for packed weights (None = W4_GEMM now), rq the rotate+quantize method (None = RQ
    now), both fixed for this f.
    """
    if group_size not in LIMITS.group_sizes or bits not in _QMAX:
        raise ValueError(f"unsupported group_size={group_size} / bits={bits}")
    mode = W4_GEMM if w4_gemm is None else w4_gemm
    _w4_route(mode, SPLIT_CHUNK, False)  # reject an unknown route or method now
    rq = _check_rq(rq)
    _jit()
    qmax = _QMAX[bits]

    def f(x, w, w_scale, bias):
        m, k = x.shape
        dev = x.device
        y = torch.empty((m, w.shape[0]), device=dev, dtype=x.dtype)
        if m == 0:
            return y
        w_packed = w.shape[1] != k
        route = _w4_route(mode, k, w_packed) if bits == 4 else "int8"
        split = route in ("split", "split_swap")
        a = torch.empty((m, k), device=dev, dtype=torch.int8)
        a_s = torch.empty((m,), device=dev, dtype=torch.float32)
        _launch_rotate_quantize(x, a, a_s, group_size, qmax, False, _fixed, split=split, rq=rq)
        if w_scale.dtype != torch.float32:
            w_scale = w_scale.float()
        if split:
            _launch_gemm_split(a, a_s, w, w_scale, bias, y, k, route == "split_swap", _fixed)
            return y
        if route == "unpack":
            w8 = torch.empty((w.shape[0], k), device=dev, dtype=torch.int8)
            _launch_unpack(w, w8)
            w, w_packed = w8, False
        _launch_gemm(a, a_s, w, w_scale, bias, y, k, False, w_packed, _fixed, w_x16=route == "packed_x16")
        return y

    return f


_op_lock = threading.Lock()
_op: list = []


def linear_op():
    """torch.ops.convrot_triton.linear.default: (x2d, w, w_scale, bias?, group_size, bits) -> y2d, as one opaque op.

    The same computation as linear_fn(group_size, bits)(x2d.contiguous(), ...), registered as a torch.library
    custom op with a shape-only fake, so torch.compile (ConvRot Compile Blocks) and FakeTensor tracing treat it
    as one node instead of tracing into the Python launcher and the autotuner. Costs a few µs more per eager call.
    """
    if not _op:
        with _op_lock:
            if not _op:
                fns: dict = {}

                def impl(x, w, w_scale, bias, group_size, bits):
                    key = (group_size, bits, W4_GEMM, RQ)
                    f = fns.get(key)
                    if f is None:
                        f = fns[key] = linear_fn(group_size, bits)
                    return f(x.contiguous(), w, w_scale, bias)

                op = torch.library.custom_op(
                    "convrot_triton::linear", impl, mutates_args=(),
                    schema="(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int group_size, int bits) -> Tensor")

                @op.register_fake
                def _(x, w, w_scale, bias, group_size, bits):
                    return x.new_empty((x.shape[0], w.shape[0]))

                _op.append(torch.ops.convrot_triton.linear.default)
    return _op[0]


def _resolve(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, torch.Tensor):
        return device.device
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def available(device=None, probe: bool = True) -> tuple[bool, str]:
    """(ok, reason) for running these kernels on `device` (torch.device, str, index, tensor or None = current)."""
    try:
        dev = _resolve(device)
        ver = triton_version()
        if ver is None:
            return False, "triton is not installed (pip install triton; on Windows: pip install triton-windows)"
        if dev.type != "cuda":
            return False, (f"{dev.type} tensors: the Triton kernels run on GPUs (TRITON_INTERPRET=1 runs them on "
                           "the CPU for tests only, slower than the PyTorch reference)")
        if not torch.cuda.is_available():
            return False, "no GPU visible to PyTorch"
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        if torch.version.hip:
            arch = getattr(props, "gcnArchName", "").split(":")[0]
            if arch not in LIMITS.rocm_archs:
                return False, (f"ROCm GPU {arch or '?'}: int8 tl.dot is only expected on CDNA2/3 "
                               f"({', '.join(LIMITS.rocm_archs)}); not enabled elsewhere")
            what = f"Triton {ver} on ROCm {arch} (correctness probe only; speed not measured)"
        else:
            cc = (props.major, props.minor)
            if cc < LIMITS.min_cuda_cc:
                return False, (f"GPU sm_{cc[0]}{cc[1]} is older than sm_80: Triton's int8 tensor-core dot needs "
                               "Ampere or newer")
            what = f"Triton {ver} on sm_{cc[0]}{cc[1]} ({props.name})"
        try:
            j = _jit()
        except Exception as e:
            return False, f"triton import failed ({type(e).__name__}: {e})"
        if j.INTERPRET:
            return False, "TRITON_INTERPRET=1 was set when the kernels were loaded: they would run in the interpreter"
        if not probe:
            return True, what
        key = ("probe", index)
        if key not in _avail_cache:
            _avail_cache[key] = _probe(torch.device("cuda", index))
        err = _avail_cache[key]
        return (True, what) if err is None else (False, f"Triton probe failed on {what}: {err}")
    except Exception as e:  # never raise into dispatch
        return False, f"Triton availability check failed ({type(e).__name__}: {e})"


def _probe(dev: torch.device) -> str | None:
    """Compile and run tiny W4A4 and W8A8 linears; compare with the PyTorch reference. None when fine.

    The shapes take the paths real layers take: K = SPLIT_CHUNK (the split W4 GEMMs), G = 256 (its two-step
    rotation) and K = 208 (K % SPLIT_CHUNK != 0: the packed_x16 fallback), with the fixed block configs; K = 768
    at G = 256 (the row kernel's three tiles, as FLUX's K = 3072) and K > ROW_MAX_K (where "row" and "auto"
    run fwht)."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        for rows, group, k in ((5, 16, SPLIT_CHUNK), (5, 256, 2 * SPLIT_CHUNK), (5, 16, 208), (3, 256, 768),
                               (3, 256, ROW_MAX_K + 256)):
            x = torch.randn(rows, k, generator=g).to(dev, torch.bfloat16).contiguous()
            for bits in (4, 8):
                qmax = _QMAX[bits]
                codes = torch.randint(-qmax, qmax + 1, (16, k), generator=g, dtype=torch.int8)
                w = (codes if bits == 8 else reference.pack_int4(codes)).to(dev).contiguous()
                ws = torch.rand(16, generator=g).to(dev) + 0.5
                y = linear_fn(group, bits, _fixed=True)(x, w, ws, None).float()
                ref = reference.convrot_linear(x, w, ws, None, group, bits).float()
                if not torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
                    return (f"W{bits}A{bits} result (G={group}, K={k}, M={rows}) differs from the reference "
                            f"(max abs err {(y - ref).abs().max().item():.3g})")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first[:300]}"
