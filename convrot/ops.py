"""Kernel dispatch: per device the route of convrot/routes.py (CUDA extension, Triton, dequant, reference).

Every entry point has the reference's signature and meaning (see reference.py); the choice is made per call from
the tensor's device, so a model that moves between CPU and GPU (ComfyUI offloading) keeps working.
"""
from __future__ import annotations

import logging

import torch

from . import reference, routes, torchmm

log = logging.getLogger("convrot")
_fallback_logged: set[str] = set()
_int_mm_ok = [True]


def _log_once(msg: str) -> None:
    if msg not in _fallback_logged:
        _fallback_logged.add(msg)
        log.warning("ConvRot: %s", msg)


def _fast(t: torch.Tensor, group_size: int, n: int | None = None):
    """The fast backend (convrot/routes.py) that takes this CUDA tensor and shape (K, N, G), else None."""
    if t.device.type != "cuda":
        return None
    r = routes.route_for(t.device)
    if r.backend is None:
        return None
    if not r.backend.supports_shape(t.shape[-1], n, group_size):
        _log_once(f"shape K={t.shape[-1]}, N={n}, G={group_size} is outside the {r.name} kernels' limits; that "
                  f"layer uses the PyTorch path")
        return None
    return r.backend


def rotate_quantize(x2d: torch.Tensor, group_size: int, bits: int = 4):
    k = _fast(x2d, group_size)
    if k is not None:
        x2d = x2d.contiguous()
        return k.rotate_quantize(x2d, group_size) if bits == 4 else k.rotate_quantize_q8(x2d, group_size)
    return reference.rotate_quantize(x2d, group_size, bits)


def quantize_weight(weight: torch.Tensor, group_size: int, bits: int = 4):
    """Offline weight quantization: (codes, per-output-channel fp32 scale). Runs on whatever device `weight` is."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        weight = weight.to(torch.float32)
    return rotate_quantize(weight, group_size, bits)


def fast_linear_fn(device: torch.device, dtype: torch.dtype, k: int, n: int, group_size: int, bits: int):
    """A layer's kernel call decided once per (device, dtype): f(x2d, w_q, w_scale, bias) -> y2d, or None.

    `linear` re-derives the route and re-validates every argument on each call (~10 µs of Python, times hundreds
    of layers per step); a layer caches this instead. The caller keeps what those checks verified: x2d contiguous
    [M > 0, k] in `dtype`, w_q/w_scale as stored by the layer, bias None or `dtype` [n]. The C++ ops still check
    shapes and dtypes, so a broken promise raises instead of reading out of bounds.
    """
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    probe = torch.empty((0, k), device=device, dtype=dtype)
    kern = _fast(probe, group_size, n)
    return None if kern is None else kern.linear_fn(group_size, bits)


_routes: dict[tuple, object] = {}


def qlinear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
            group_size: int, bits: int) -> torch.Tensor:
    """The quantized linear every host calls (engine ConvRotLinear, the ComfyUI layers, ComfyUI's own
    QuantizedTensor dispatch): y = x·Wᵀ + bias in x's dtype, W given as ConvRot codes + per-row scales.

    The kernel route is decided once per (device, dtype, K, N, G, bits) and kept (`fast_linear_fn`), so a call
    costs a dict lookup besides the kernels; under torch.compile the checked `linear` is traced instead (its Python
    runs once per compilation). A bias in another dtype is cast here, so callers may pass the stored one.
    """
    n = w_scale.shape[0]
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    # `type(x) is torch.Tensor`: when torch.compile runs a QuantizedTensor's F.linear on FakeTensors (Dynamo
    # propagates the whole call as one node, outside tracing), a raw launcher such as Triton's would read their
    # data pointers; the checked path goes through registered custom ops with fake kernels.
    if x.numel() and type(x) is torch.Tensor and not torch.compiler.is_compiling() and w_q.device == x.device:
        key = (x.device, x.dtype, x.shape[-1], n, group_size, bits)
        fn = _routes.get(key, _routes)
        if fn is _routes:
            fn = _routes[key] = fast_linear_fn(x.device, x.dtype, x.shape[-1], n, group_size, bits)
        if fn is not None:
            x2d = x.reshape(-1, x.shape[-1])
            if not x2d.is_contiguous():
                x2d = x2d.contiguous()
            return fn(x2d, w_q, w_scale, bias).view(*x.shape[:-1], n)
    return linear(x, w_q, w_scale, bias, group_size, bits)


def linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
           group_size: int, bits: int = 4) -> torch.Tensor:
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    k = _fast(x2d, group_size, w_scale.shape[0]) if x.dtype in (torch.float16, torch.bfloat16) else None
    if k is not None and x2d.shape[0] > 0:
        fn = k.w4a4_linear if bits == 4 else k.w8a8_linear
        out = fn(x2d.contiguous(), w_q, w_scale, bias, group_size)
    elif bits == 8 and x.device.type == "cuda" and x2d.shape[0] > 0 and w_q.shape[0] % 8 == 0 and _int_mm_ok[0]:
        try:
            out = _w8a8_cuda(x2d, w_q, w_scale, bias, group_size)
        except RuntimeError as e:  # cuBLAS int8 is missing on some GPUs/builds (pre-Ampere, some ROCm)
            _int_mm_ok[0] = False
            _log_once(f"torch._int_mm failed ({e}); W8A8 layers use the PyTorch reference path")
            return linear(x, w_q, w_scale, bias, group_size, bits)
    else:
        a_q, a_scale = reference.rotate_quantize(x2d, group_size, bits)
        out = reference.quantized_gemm(a_q, a_scale, w_q, w_scale, bias, x.dtype, bits)
    return out.reshape(*lead, w_scale.shape[0])


def _w8a8_cuda(x2d, w_q, w_scale, bias, group_size):
    """W8A8 on the reference route on CUDA (forced, or a shape no backend takes): reference rotate+quantize (torch
    ops), then cuBLAS int8, exact like the reference. The dequant route does not use it (convrot/dequant.py: why)."""
    a_q, a_scale = reference.rotate_quantize(x2d, group_size, 8)
    return int8_mm(a_q, a_scale, w_q, w_scale, bias, x2d.dtype)


def int8_mm(a8, a_scale, w8, w_scale, bias, out_dtype):
    """int8 codes [M, K] x [N, K]ᵀ through torch._int_mm (cuBLAS int8 on CUDA), then the scales and bias: the
    torchmm route's GEMM and epilogue (tiny batches padded there)."""
    return torchmm.epilogue(torchmm.int_mm(a8, w8), a_scale, w_scale, bias, out_dtype)
