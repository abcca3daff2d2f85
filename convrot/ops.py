"""Kernel dispatch: the CUDA extension where it is built and supports the device, the reference ops elsewhere.

Every entry point has the reference's signature and meaning (see reference.py); the choice is made per call from
the tensor's device, so a model that moves between CPU and GPU (ComfyUI offloading) keeps working.
"""
from __future__ import annotations

import logging

import torch

from . import reference

log = logging.getLogger("convrot")
_fallback_logged: set[str] = set()


def _kernels():
    """The compiled-kernel module when usable for CUDA tensors, else None (the reason is logged once)."""
    try:
        from . import kernels
    except Exception as e:  # the package is optional: a broken or absent build must never break inference
        _log_once(f"CUDA kernels unavailable ({type(e).__name__}: {e}); using the PyTorch reference path")
        return None
    return kernels


def _log_once(msg: str) -> None:
    if msg not in _fallback_logged:
        _fallback_logged.add(msg)
        log.warning("ConvRot: %s", msg)


def _fast(t: torch.Tensor, bits: int):
    if t.device.type != "cuda" or bits != 4:
        return None
    k = _kernels()
    if k is None:
        return None
    try:
        return k if k.available(t.device) else None
    except Exception as e:
        _log_once(f"CUDA kernels unavailable ({e}); using the PyTorch reference path")
        return None


def rotate_quantize(x2d: torch.Tensor, group_size: int, bits: int = 4):
    k = _fast(x2d, bits)
    if k is not None:
        return k.rotate_quantize(x2d.contiguous(), group_size)
    return reference.rotate_quantize(x2d, group_size, bits)


def quantize_weight(weight: torch.Tensor, group_size: int, bits: int = 4):
    """Offline weight quantization: (codes, per-output-channel fp32 scale). Runs on whatever device `weight` is."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        weight = weight.to(torch.float32)
    return rotate_quantize(weight, group_size, bits)


def linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
           group_size: int, bits: int = 4) -> torch.Tensor:
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    k = _fast(x2d, bits) if x.dtype in (torch.float16, torch.bfloat16) else None
    if k is not None and x2d.shape[0] > 0:
        out = k.w4a4_linear(x2d.contiguous(), w_q, w_scale, bias, group_size)
    elif bits == 8 and x.device.type == "cuda" and x2d.shape[0] > 0 and w_q.shape[0] % 8 == 0:
        out = _w8a8_cuda(x2d, w_q, w_scale, bias, group_size)
    else:
        a_q, a_scale = reference.rotate_quantize(x2d, group_size, bits)
        if torch.compiler.is_compiling():
            out = _quantized_gemm_static(a_q, a_scale, w_q, w_scale, bias, x.dtype, bits)
        else:
            out = reference.quantized_gemm(a_q, a_scale, w_q, w_scale, bias, x.dtype, bits)
    return out.reshape(*lead, w_scale.shape[0])


def _quantized_gemm_static(a_q, a_scale, w_q, w_scale, bias, out_dtype, bits):
    """reference.quantized_gemm for torch.compile: the fp32/fp64 choice from the shape alone.

    reference.int_matmul bounds the accumulator with the codes' actual max (`int(tensor)`: a dynamo graph break per
    call, and per-layer recompiles of the frames around it). Codes never exceed 8 (a nibble) or 128 in magnitude,
    so qmax² · K bounds the sums just as well; either choice accumulates integers exactly, so results are identical.
    Integer codes up to 2^11 are exact in TF32 as well, so the CUDA TF32 setting does not matter here.
    """
    a, w = reference.codes_of(a_q, bits), reference.codes_of(w_q, bits)
    q = 8 if bits == 4 else 128
    dt = torch.float32 if q * q * a.shape[-1] < 2**24 else torch.float64
    acc = (a.to(dt) @ w.to(dt).t()).to(torch.float32)
    out = acc * a_scale.to(torch.float32).unsqueeze(-1) * w_scale.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def _w8a8_cuda(x2d, w_q, w_scale, bias, group_size):
    """W8A8 on CUDA: reference rotate+quantize (torch ops), then cuBLAS int8 GEMM through torch._int_mm.

    _int_mm wants M > 16 and K, N multiples of 8, so tiny batches are padded with zero rows.
    """
    a_q, a_scale = reference.rotate_quantize(x2d, group_size, 8)
    m = a_q.shape[0]
    if m <= 16:
        a_q = torch.cat((a_q, a_q.new_zeros(17 - m, a_q.shape[1])))
    acc = torch._int_mm(a_q, w_q.t())[:m]
    out = acc.to(torch.float32) * a_scale.unsqueeze(-1) * w_scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x2d.dtype)
