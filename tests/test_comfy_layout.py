"""ConvRot weights as ComfyUI QuantizedTensors: F.linear on them runs convrot.ops.qlinear (nodes/layout.py).

On the CPU the reference path runs; on a GPU (skipped without one) the kernels. Every form ComfyUI's code reaches
the dispatch in is checked against a direct qlinear call on fresh inputs with outlier channels: aten.linear,
the decomposed t + mm / addmm of 2-D and 3-D inputs, with and without bias; ComfyUI's non-ConvRot int8 weights
keep comfy-kitchen's handler.
"""
from __future__ import annotations

import pytest
import torch


def _qt(comfy, bits, n, k, g, device, dtype):
    from comfy.quant_ops import QuantizedTensor, TensorCoreConvRotW4A4Layout, TensorWiseINT8Layout
    ops = comfy.pack.convrot.ops
    w = torch.randn(n, k, device=device) / k ** 0.5
    w[:, 3] *= 25  # an outlier input channel
    q, s = ops.quantize_weight(w, g, bits)
    if bits == 4:
        p = TensorCoreConvRotW4A4Layout.Params(scale=s, orig_dtype=dtype, orig_shape=(n, k), convrot_groupsize=g)
        return QuantizedTensor(q, "TensorCoreConvRotW4A4Layout", p), q, s
    p = TensorWiseINT8Layout.Params(scale=s, orig_dtype=dtype, orig_shape=(n, k), convrot=True, convrot_groupsize=g)
    return QuantizedTensor(q, "TensorWiseINT8Layout", p), q, s


def _inputs(m, k, device, dtype, lead3=False):
    x = torch.randn(*((2, m) if lead3 else (m,)), k, device=device, dtype=dtype)
    x[..., 5] *= 30  # outlier activation channel
    return x


def _check(comfy, device, dtype):
    ops = comfy.pack.convrot.ops
    for bits in (4, 8):
        for g in (64, 256):
            n, k = 72, 512
            qt, q, s = _qt(comfy, bits, n, k, g, device, dtype)
            bias = torch.randn(n, device=device, dtype=dtype)
            for lead3 in (False, True):
                for b in (bias, None):
                    x = _inputs(17, k, device, dtype, lead3)
                    want = ops.qlinear(x, q, s, b, g, bits)
                    got = torch.nn.functional.linear(x, qt, b)
                    assert got.shape == want.shape and got.dtype == x.dtype
                    assert torch.equal(got, want), (bits, g, lead3, b is None)
                    # the decomposed forms, as autograd-free aten ops
                    x2 = x.reshape(-1, k)
                    assert torch.equal(torch.mm(x2, qt.t()), ops.qlinear(x2, q, s, None, g, bits))
                    if b is not None:
                        assert torch.equal(torch.addmm(b, x2, qt.t()), ops.qlinear(x2, q, s, b, g, bits))


def test_quantized_tensor_linear_runs_convrot_core_cpu(comfy):
    _check(comfy, "cpu", torch.float32)
    _check(comfy, "cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernel route)")
def test_quantized_tensor_linear_runs_convrot_core_gpu(comfy):
    _check(comfy, "cuda", torch.bfloat16)
    _check(comfy, "cuda", torch.float16)


def test_non_convrot_int8_weight_keeps_kitchens_handler(comfy):
    from comfy.quant_ops import QuantizedTensor
    w = torch.randn(64, 256)
    qt = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", is_weight=True)
    assert not getattr(qt._params, "convrot", False)
    x = torch.randn(9, 256)
    y = torch.nn.functional.linear(x, qt)
    assert (y - x @ w.t()).norm() / (x @ w.t()).norm() < 0.05  # kitchen's int8 path, not ConvRot's rotation
