"""The quantized attention of convrot/attention.py as Triton kernels (flash-attention style), for sm_80+.

Three launches per call (plus two torch reductions for the K and V means and V's channel range):
- quantize Q and K to INT8 per token block (Q pre-multiplied by sm_scale·log2 e, K minus its channel mean),
  written padded with zero codes to whole blocks, so the attention kernel loads them without masks;
- quantize V to FP8 e4m3 per channel (mean subtracted), stored transposed [B·H, D, Lpad] (tokens contiguous): the
  K-major B operand that FP8 tensor-core MMAs (Hopper's wgmma, Ada's mma) take without a shared-memory transpose;
- attention: per (query block, head) a loop over key blocks of `k_block` tokens: tl.dot on the int8 codes into
  int32 (exact), times the two block scales, online softmax in fp32 with exp2, then P·V as an FP8 dot
  (P·448 in e4m3) or a 16-bit dot (V as given), accumulated in fp32 outside the dot; the output is written in
  [B, Lq, H, D] memory, which ComfyUI's [B, L, H·D] result is a view of.

This module imports only torch; triton is imported on first use. Host code has no synchronisation (CUDA graphs),
and `attention_op()` is a torch.library custom op with a shape-only fake (torch.compile keeps it one node).

API
---
available(device=None, probe=True) -> (ok, reason)   never raises; the probe compiles and checks once per device
attention(q, k, v, cfg=DEFAULT, sm_scale=None) -> [B, H, Lq, D] (a view of [B, Lq, H, D] memory), q's dtype
quantize(q, k, v, cfg, sm_scale) -> the kernel's operands (for tests: compared with the reference's codes)
attention_op() -> torch.ops.convrot_attn.qattn.default(q, k, v, sm_scale, q_block, k_block, smooth_k, smooth_v, pv)
    -> [B, Lq, H, D]; CUDA tensors run the kernels, CPU tensors the reference (tests, forced reference path)
Limits: q, k, v fp16/bf16 [B, H, L, D] with D in (64, 128), any strides; Lq, Lk >= 1 (cross-attention allowed);
no mask. cfg.quant_qk must be True and pv "fp8" (sm_89+) or "bf16".
"""
from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import torch

from . import attention as ref
from .attention import DEFAULT, FP8_MAX, HEAD_DIMS, INT8_MAX, LOG2E, SCALE_FLOOR, QAttnConfig

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MIN_CC = (8, 0)
FP8_CC = (8, 9)
# CONVROT_QATTN_AUTOTUNE=1 times a few tile configs per shape on first use (host syncs: warm up before capturing
# CUDA graphs); off, one fixed config per GPU generation runs
AUTOTUNE = os.environ.get("CONVROT_QATTN_AUTOTUNE", "0") not in ("0", "")
# (BLOCK_M, num_warps, num_stages); BLOCK_M must divide cfg.q_block
FIXED_CONFIG = {"sm90": (128, 8, 3), "other": (128, 4, 3)}
TUNE_CONFIGS = ((64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (128, 8, 4), (128, 4, 4))

_lock = threading.Lock()
_kernels: list = []
_avail: dict = {}


# ------------------------------------------------------------------------------------------------ kernels
# Plain functions, made Triton kernels by _jit() once triton is imported (it binds `tl` into this module first;
# the annotations stay strings under `from __future__ import annotations`, which Triton reads).

def _rtne_e4m3_fn(x):
    """x (fp32, |x| <= 448) rounded to e4m3's grid, ties to even, in fp32: the interpreter truncates on conversion,
    the GPU rounds to nearest even (an exactly representable value converts the same either way)."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + (0x7FFFF + ((bits >> 20) & 1))) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0  # subnormals: multiples of 2^-9
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


def _rtne_bf16_fn(x):
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).to(tl.float32, bitcast=True)


def _quant_qk_kernel(X, MEAN, C, S, L, LPAD, NBLK, H, sxb, sxh, sxl, sxd, mult,
                     HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    tok = blk * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    valid = tok < L
    x = tl.load(X + b * sxb + h * sxh + tok[:, None] * sxl + d[None, :] * sxd, mask=valid[:, None], other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        mu = tl.load(MEAN + bh * D + d)
        x = tl.where(valid[:, None], x - mu[None, :], 0.0)
    x = x * mult
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-10) / 127.0
    r = x / scale
    r = (r + 12582912.0) - 12582912.0  # 1.5·2^23: rounds |r| < 2^22 to the nearest integer, ties to even
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(C + bh.to(tl.int64) * LPAD * D + tok[:, None] * D + d[None, :], r.to(tl.int8))
    tl.store(S + bh * NBLK + blk, scale)


def _quant_v_kernel(X, MEAN, SCALE, C, L, LPAD, H, sxb, sxh, sxl, sxd,
                    HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, INTERP: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    tok = blk * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    valid = tok < L
    x = tl.load(X + b * sxb + h * sxh + tok[:, None] * sxl + d[None, :] * sxd, mask=valid[:, None], other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        mu = tl.load(MEAN + bh * D + d)
        x = x - mu[None, :]
    r = x / tl.load(SCALE + bh * D + d)[None, :]
    r = tl.where(valid[:, None], tl.minimum(tl.maximum(r, -448.0), 448.0), 0.0)
    if INTERP:
        r = _rtne_e4m3(r)
    tl.store(C + bh.to(tl.int64) * D * LPAD + d[None, :] * LPAD + tok[:, None],
             r.to(tl.float8e4nv, fp_downcast_rounding="rtne"))


def _attn_kernel(QC, QS, KC, KS, V, VS, VMU, O, H, LQ, LK, LQPAD, LKPAD, NQB, NKB,
                 svb, svh, svl, svd, sob, sol, soh,
                 Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                 FP8_PV: tl.constexpr, HAS_VMU: tl.constexpr, EVEN_N: tl.constexpr, INTERP: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    q = tl.load(QC + bh64 * LQPAD * D + offs_m[:, None] * D + d[None, :])
    q_scale = tl.load(QS + bh * NQB + (pid_m * BLOCK_M) // Q_BLOCK)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    k_base = KC + bh64 * LKPAD * D
    for start in range(0, LK, BLOCK_N):
        cols = start + offs_n
        kt = tl.load(k_base + cols[None, :] * D + d[:, None])  # [D, BLOCK_N]: codes padded, no mask
        k_scale = tl.load(KS + bh * NKB + start // BLOCK_N)
        if INTERP:  # the interpreter: the same integers through a float matmul
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        else:
            s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32)
        s = s * q_scale * k_scale
        if not EVEN_N:
            s = tl.where(cols[None, :] < LK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP8_PV:
            vt = tl.load(V + bh64 * D * LKPAD + d[None, :] * LKPAD + cols[:, None])  # [BLOCK_N, D] e4m3
            if INTERP:
                pv = tl.dot(_rtne_e4m3(p * 448.0), vt.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                pv = tl.dot((p * 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne"), vt, out_dtype=tl.float32)
        else:
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svl + d[None, :] * svd,
                        mask=cols[:, None] < LK, other=0.0)
            if INTERP:
                p16 = _rtne_bf16(p) if v.dtype == tl.bfloat16 else p.to(v.dtype).to(tl.float32)
                pv = tl.dot(p16, v.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        # a separate add: the fp32 running sum never goes through the MMA's accumulator (Hopper's FP8 MMA
        # accumulates with fewer mantissa bits; Triton does not fold it into the dot while imprecise accumulation
        # is allowed)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    if FP8_PV:
        out = out * (tl.load(VS + bh * D + d) / 448.0)[None, :]
        if HAS_VMU:
            out = out + tl.load(VMU + bh * D + d)[None, :]
    if INTERP and O.dtype.element_ty == tl.bfloat16:
        out = _rtne_bf16(out)
    tl.store(O + b.to(tl.int64) * sob + offs_m[:, None] * sol + h * soh + d[None, :],
             out.to(O.dtype.element_ty), mask=offs_m[:, None] < LQ)


def _jit():
    """The jitted kernels (imports triton; ImportError without it). Interpreted when TRITON_INTERPRET=1 then."""
    if not _kernels:
        with _lock:
            if not _kernels:
                import triton
                import triton.language as tl_mod

                globals()["tl"] = tl_mod
                globals()["_rtne_e4m3"] = triton.jit(_rtne_e4m3_fn)
                globals()["_rtne_bf16"] = triton.jit(_rtne_bf16_fn)
                interp = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
                attn = triton.jit(_attn_kernel)
                tuned = None
                if not interp:
                    tuned = triton.autotune(
                        [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in TUNE_CONFIGS],
                        key=["LQ", "LK", "D", "FP8_PV", "Q_BLOCK", "BLOCK_N"],
                        prune_configs_by={"early_config_prune": _prune})(triton.jit(_attn_kernel))
                _kernels.append(SimpleNamespace(
                    triton=triton, INTERPRET=interp, quant_qk=triton.jit(_quant_qk_kernel),
                    quant_v=triton.jit(_quant_v_kernel), attn=attn, attn_tuned=tuned))
    return _kernels[0]


def _prune(configs, named_args, **kwargs):
    qb = kwargs.get("Q_BLOCK", named_args.get("Q_BLOCK", 128))
    kept = [c for c in configs if qb % c.kwargs["BLOCK_M"] == 0]
    return kept or configs[:1]


# ------------------------------------------------------------------------------------------------ host side

def _check(q, k, v, cfg: QAttnConfig):
    ref.check_inputs(q, k, v, "convrot quantized attention (Triton)")
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"convrot quantized attention (Triton): q, k, v must share one dtype of {KERNEL_DTYPES}; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"convrot quantized attention (Triton): head dim {q.shape[-1]} not in {HEAD_DIMS}")
    if not cfg.quant_qk or cfg.pv not in ("fp8", "bf16"):
        raise ValueError(f"convrot quantized attention (Triton): runs INT8 QK with fp8 or bf16 P·V, not "
                         f"{cfg.describe()}")
    if cfg.q_block > 256 or cfg.k_block > 256:
        raise ValueError(f"convrot quantized attention (Triton): q_block/k_block at most 256, got "
                         f"{cfg.q_block}/{cfg.k_block}")


def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def quantize(q, k, v, cfg: QAttnConfig = DEFAULT, sm_scale: float | None = None):
    """The attention kernel's operands: dict of Q/K int8 codes [B·H, Lpad, D] + scales, V (fp8 transposed
    [B·H, D, Lkpad] with scale and mean, or V itself for bf16 P·V)."""
    j = _jit()
    b, h, lq, d = q.shape
    lk = k.shape[2]
    sm = ref.default_scale(d) if sm_scale is None else float(sm_scale)
    lqp, lkp = _pad(lq, cfg.q_block), _pad(lk, cfg.k_block)
    nqb, nkb = lqp // cfg.q_block, lkp // cfg.k_block
    dev = q.device
    qc = torch.empty((b * h, lqp, d), device=dev, dtype=torch.int8)
    qs = torch.empty((b * h, nqb), device=dev, dtype=torch.float32)
    kc = torch.empty((b * h, lkp, d), device=dev, dtype=torch.int8)
    ks = torch.empty((b * h, nkb), device=dev, dtype=torch.float32)
    j.quant_qk[(nqb, b * h)](q, qs, qc, qs, lq, lqp, nqb, h, *q.stride(), sm * LOG2E,
                             HAS_MEAN=False, BLOCK=cfg.q_block, D=d)
    kmu = ref.token_mean(k).contiguous() if cfg.smooth_k else None
    j.quant_qk[(nkb, b * h)](k, ks if kmu is None else kmu, kc, ks, lk, lkp, nkb, h, *k.stride(), 1.0,
                             HAS_MEAN=kmu is not None, BLOCK=cfg.k_block, D=d)
    ops = dict(qc=qc, qs=qs, kc=kc, ks=ks, lq=lq, lk=lk, lqp=lqp, lkp=lkp, nqb=nqb, nkb=nkb)
    if cfg.pv == "fp8":
        smooth = cfg.smooth_v
        vmu = ref.token_mean(v) if smooth else None
        vmin, vmax = torch.aminmax(v, dim=2, keepdim=True)
        vmin, vmax = vmin.to(torch.float32), vmax.to(torch.float32)
        amax = torch.maximum(vmax - vmu, vmu - vmin) if smooth else torch.maximum(vmax.abs(), vmin.abs())
        vs = (amax.clamp_min(SCALE_FLOOR) / FP8_MAX).reshape(b * h, d).contiguous()
        vc = torch.empty((b * h, d, lkp), device=dev, dtype=torch.float8_e4m3fn)
        vmu2 = None if vmu is None else vmu.reshape(b * h, d).contiguous()
        j.quant_v[(nkb, b * h)](v, vs if vmu2 is None else vmu2, vs, vc, lk, lkp, h, *v.stride(),
                                HAS_MEAN=vmu2 is not None, BLOCK=cfg.k_block, D=d, INTERP=j.INTERPRET)
        ops.update(v=vc, vs=vs, vmu=vmu2)
    else:
        ops.update(v=v, vs=None, vmu=None)
    return ops


def _arch(dev: torch.device) -> str:
    cc = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else (0, 0)
    return "sm90" if cc[0] == 9 else "other"


def attention(q, k, v, cfg: QAttnConfig = DEFAULT, sm_scale: float | None = None, *,
              config: tuple[int, int, int] | None = None, autotune: bool | None = None) -> torch.Tensor:
    """Quantized attention [B, H, Lq, D] (a view of [B, Lq, H, D] memory) in q's dtype. `config` =
    (BLOCK_M, num_warps, num_stages) overrides the tile choice (benchmarks)."""
    _check(q, k, v, cfg)
    j = _jit()
    b, h, lq, d = q.shape
    ops = quantize(q, k, v, cfg, sm_scale)
    out = torch.empty((b, lq, h, d), device=q.device, dtype=q.dtype)
    fp8 = cfg.pv == "fp8"
    vv, vs, vmu = ops["v"], ops["vs"], ops["vmu"]
    vstr = (0, 0, 0, 0) if fp8 else vv.stride()
    args = (ops["qc"], ops["qs"], ops["kc"], ops["ks"], vv, vs if vs is not None else ops["qs"],
            vmu if vmu is not None else ops["qs"], out, h, lq, ops["lk"], ops["lqp"], ops["lkp"], ops["nqb"],
            ops["nkb"], *vstr, out.stride(0), out.stride(1), out.stride(2))
    consts = dict(Q_BLOCK=cfg.q_block, BLOCK_N=cfg.k_block, D=d, FP8_PV=fp8, HAS_VMU=vmu is not None,
                  EVEN_N=ops["lk"] % cfg.k_block == 0, INTERP=j.INTERPRET)
    tune = AUTOTUNE if autotune is None else autotune
    if tune and config is None and j.attn_tuned is not None:
        j.attn_tuned[lambda meta: (triton_cdiv(lq, meta["BLOCK_M"]), b * h)](*args, **consts)
    else:
        bm, nw, ns = config or (FIXED_CONFIG[_arch(q.device)] if not j.INTERPRET else (min(64, cfg.q_block), 4, 1))
        bm = min(bm, cfg.q_block)
        if cfg.q_block % bm:
            raise ValueError(f"BLOCK_M={bm} must divide q_block={cfg.q_block}")
        extra = {} if j.INTERPRET else dict(num_warps=nw, num_stages=ns)
        j.attn[(triton_cdiv(lq, bm), b * h)](*args, **consts, BLOCK_M=bm, **extra)
    return out.permute(0, 2, 1, 3)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def best_config(q) -> str | None:
    """The autotuner's pick for the last shape it tuned (benchmarks), as text."""
    j = _jit()
    t = j.attn_tuned
    if t is None or not getattr(t, "cache", None):
        return None
    cfg = list(t.cache.values())[-1]
    return f"BLOCK_M={cfg.kwargs.get('BLOCK_M')}, num_warps={cfg.num_warps}, num_stages={cfg.num_stages}"


# ------------------------------------------------------------------------------------------------ custom op

_op: list = []
_op_lock = threading.Lock()


def attention_op():
    """torch.ops.convrot_attn.qattn.default -> [B, Lq, H, D]: the kernels for CUDA tensors, the reference for CPU
    tensors; a shape-only fake for torch.compile / FakeTensor tracing."""
    if not _op:
        with _op_lock:
            if not _op and hasattr(torch.ops.convrot_attn, "qattn"):
                # registered by another copy of this module (the pack as ComfyUI imports it, and `convrot` as the
                # tests and tools import it): one op per process, the same arithmetic
                _op.append(torch.ops.convrot_attn.qattn.default)
            if not _op:
                def impl(q, k, v, sm_scale, q_block, k_block, smooth_k, smooth_v, pv):
                    cfg = QAttnConfig(q_block=q_block, k_block=k_block, smooth_k=smooth_k, smooth_v=smooth_v, pv=pv)
                    if q.device.type == "cuda":
                        return attention(q, k, v, cfg, sm_scale).permute(0, 2, 1, 3)
                    return ref.reference_attention(q, k, v, cfg, sm_scale).permute(0, 2, 1, 3).contiguous()

                op = torch.library.custom_op(
                    "convrot_attn::qattn", impl, mutates_args=(),
                    schema="(Tensor q, Tensor k, Tensor v, float sm_scale, int q_block, int k_block, bool smooth_k, "
                           "bool smooth_v, str pv) -> Tensor")

                @op.register_fake
                def _(q, k, v, sm_scale, q_block, k_block, smooth_k, smooth_v, pv):
                    b, h, lq, d = q.shape
                    return q.new_empty((b, lq, h, d))

                _op.append(torch.ops.convrot_attn.qattn.default)
    return _op[0]


def run_op(q, k, v, cfg: QAttnConfig = DEFAULT, sm_scale: float | None = None) -> torch.Tensor:
    """attention_op() with cfg unpacked; [B, Lq, H, D]."""
    sm = ref.default_scale(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return attention_op()(q, k, v, sm, cfg.q_block, cfg.k_block, cfg.smooth_k, cfg.smooth_v, cfg.pv)


# ------------------------------------------------------------------------------------------------ availability

def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001
        return None
    return triton.__version__


def device_config(cfg: QAttnConfig, device) -> QAttnConfig:
    """cfg as it runs on `device`: bf16 P·V where the GPU has no FP8 tensor cores."""
    dev = torch.device(device)
    cc = torch.cuda.get_device_capability(dev) if dev.type == "cuda" and torch.cuda.is_available() else None
    return ref.for_device(cfg, cc)


def available(device=None, probe: bool = True, cfg: QAttnConfig = DEFAULT) -> tuple[bool, str]:
    """(ok, reason): whether the kernels run on `device`; reason says why not, or what runs. Never raises."""
    try:
        dev = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        ver = triton_version()
        if dev.type != "cuda":
            return False, f"the model runs on the {dev.type.upper()} (the quantized attention kernel needs an NVIDIA GPU)"
        if not torch.cuda.is_available():
            return False, "no GPU visible to PyTorch"
        if torch.version.hip:
            return False, "ROCm GPU: the quantized attention kernel is built and tested for NVIDIA GPUs only"
        if ver is None:
            return False, "triton is not installed (pip install triton; on Windows: pip install triton-windows)"
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        cc = (props.major, props.minor)
        if cc < MIN_CC:
            return False, f"GPU sm_{cc[0]}{cc[1]} is older than sm_80 (Triton's int8 tensor-core dot needs Ampere+)"
        run_cfg = ref.for_device(cfg, cc)
        what = f"Triton {ver} on sm_{cc[0]}{cc[1]} ({props.name}): {run_cfg.describe()}"
        try:
            j = _jit()
        except Exception as e:  # noqa: BLE001
            return False, f"triton import failed ({type(e).__name__}: {e})"
        if j.INTERPRET:
            return False, "TRITON_INTERPRET=1 was set when the kernels were loaded: they would run in the interpreter"
        if not probe:
            return True, what
        key = (index, run_cfg)
        if key not in _avail:
            _avail[key] = _probe(torch.device("cuda", index), run_cfg)
        err = _avail[key]
        return (True, what) if err is None else (False, f"probe failed on {what}: {err}")
    except Exception as e:  # noqa: BLE001 - never raise into the node
        return False, f"availability check failed ({type(e).__name__}: {e})"


def _probe(dev: torch.device, cfg: QAttnConfig) -> str | None:
    """Compile and run one small attention (odd length) against the reference; None when it agrees."""
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 77, 128, generator=g).to(dev, torch.bfloat16) for _ in range(3))
        out = attention(q, k, v, cfg).float()
        want = ref.reference_attention(q, k, v, cfg).float()
        err = float((out - want).norm() / want.norm())
        torch.cuda.synchronize(dev)
        return None if err < 2e-2 else f"differs from the reference (relative error {err:.3g})"
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first[:300]}"
