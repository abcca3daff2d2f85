"""The "dequant" route (convrot/dequant.py): y = x·Ŵᵀ + bias with Ŵ the dequantized weight in the original basis.

On the CPU the backend is called directly (the route itself applies to CUDA tensors only); its result is compared
with a float computation from reference.dequantize_weight on fresh random inputs with outlier channels. On a GPU the
route is forced and a quantized layer is compared with the same computation on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from convrot import ConvRotLinear, dequant, ops, reference, routes
from convrot.hadamard import regular_hadamard

CUDA = torch.cuda.is_available()
# K = 3 groups of G (not a power of two), odd M and N
SHAPES = [(1, 16, 25), (7, 64, 9), (33, 256, 40)]
# bf16 rounds the rotated x, the weight and the output once each (2^-9 relative): a few of those in the norm
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(m, g, n, dtype, seed):
    """x with outlier channels and a large row, a float weight, its codes (both bit widths) and a bias."""
    gen = torch.Generator().manual_seed(seed)
    k = 3 * g
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:3]] *= 50
    x[0] *= 8
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, torch.randint(k, (1,), generator=gen)] *= 10  # an outlier input channel in the weight too
    bias = torch.randn(n, generator=gen)
    return x.to(dtype), w, bias.to(dtype)


def _float(x, w_hat, bias):
    y = x.double() @ w_hat.double().t()
    return y if bias is None else y + bias.double()


def _rel(y, want):
    return ((y.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m, g, n", SHAPES)
def test_matches_the_dequantized_float_weight(m, g, n, has_bias, bits, dtype):
    x, w, bias = _inputs(m, g, n, dtype, seed=m * 1000 + g + bits)
    bias = bias if has_bias else None
    w_q, w_s = reference.rotate_quantize(w, g, bits)
    want = _float(x, reference.dequantize_weight(w_q, w_s, g, bits), bias)
    for y in (dequant.linear(x, w_q, w_s, bias, g, bits),
              (dequant.w4a4_linear if bits == 4 else dequant.w8a8_linear)(x, w_q, w_s, bias, g),
              dequant.linear_fn(g, bits)(x, w_q, w_s, bias)):
        assert y.dtype == dtype and y.shape == (m, n)
        assert _rel(y, want) < TOL[dtype], _rel(y, want)


@pytest.mark.parametrize("bits, dtype", [(4, torch.bfloat16), (8, torch.float32)])
@pytest.mark.parametrize("g", [16, 64, 256])
def test_closer_to_the_float_layer_than_the_activation_quantized_reference(g, bits, dtype):
    """Weight-only quantization leaves the activations alone: nearer the unquantized layer than W4A4 / W8A8.

    8-bit in fp32: there the activations' 8-bit error is about bf16's rounding of the route's operands, so in bf16
    the two are level (the 8-bit weight error dominates both); 4-bit activations lose far more than that."""
    x, w, bias = _inputs(64, g, 48, dtype, seed=7 + g + bits)
    w_q, w_s = reference.rotate_quantize(w, g, bits)
    exact = _float(x, w, bias)
    ours = _rel(dequant.linear(x, w_q, w_s, bias, g, bits), exact)
    act_quantized = _rel(reference.convrot_linear(x, w_q, w_s, bias, g, bits), exact)
    assert ours < 0.95 * act_quantized, (ours, act_quantized)  # the route itself quantizing x would give 1.0


def test_bias_in_another_dtype_is_cast():
    x, w, bias = _inputs(5, 64, 16, torch.bfloat16, seed=3)
    w_q, w_s = reference.rotate_quantize(w, 64, 4)
    y = dequant.linear(x, w_q, w_s, bias.float(), 64, 4)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, dequant.linear(x, w_q, w_s, bias, 64, 4))


def test_fp16_activations_aligned_with_a_hadamard_row_do_not_overflow():
    """x = A·sign(row 0 of H): x·H has A·√G in channel 0, past fp16's range for A = 8192, G = 256, while F.linear of
    x with the dequantized weight stays finite; the route rotates by H/√G, so it does too."""
    g, a = 256, 8192.0
    h = regular_hadamard(g)
    x = (a * torch.sign(h[0])).repeat(2, 3).to(torch.float16)
    assert torch.isinf((x.float() @ torch.block_diag(h, h, h)).to(torch.float16)).any()  # the hazard is real
    _, w, bias = _inputs(2, g, 8, torch.float16, seed=5)
    w_q, w_s = reference.rotate_quantize(w * 0.01, g, 4)
    want = _float(x, reference.dequantize_weight(w_q, w_s, g, 4), bias)
    assert want.abs().max() < 6e4
    y = dequant.linear(x, w_q, w_s, bias, g, 4)
    assert torch.isfinite(y).all() and _rel(y, want) < TOL[torch.float16]


def test_traces_as_one_graph():
    """Pure torch ops: torch.compile takes the whole linear without a graph break (aot_eager: no C++ compiler)."""
    x, w, bias = _inputs(9, 64, 24, torch.bfloat16, seed=11)
    w_q, w_s = reference.rotate_quantize(w, 64, 4)
    torch._dynamo.reset()
    f = torch.compile(dequant.linear, backend="aot_eager", fullgraph=True)
    assert torch.equal(f(x, w_q, w_s, bias, 64, 4), dequant.linear(x, w_q, w_s, bias, 64, 4))


def test_supports_every_k_that_quantizes():
    assert all(dequant.supports_shape(3 * g, n, g) for g in (16, 64, 256) for n in (1, 25, None))
    assert not dequant.supports_shape(3 * 64 + 16, 24, 64) and not dequant.supports_shape(96, 24, 32)


def test_activation_quantization_is_the_reference():
    x, _, _ = _inputs(5, 64, 8, torch.bfloat16, seed=13)
    for got, bits in ((dequant.rotate_quantize(x, 64), 4), (dequant.rotate_quantize_q8(x, 64), 8)):
        want = reference.rotate_quantize(x, 64, bits)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 8])
def test_forced_route_on_a_gpu_matches_the_cpu(bits, monkeypatch):
    """CONVROT_ROUTE=dequant on a CUDA device: a ConvRotLinear (cached per-layer call), ops.linear (checked call)
    and the compiled layer give the CPU's float result within bf16 rounding, which the W4A4/W8A8 math does not."""
    monkeypatch.setenv(routes.ENV, "dequant")
    routes.reset()
    try:
        dev = torch.device("cuda", torch.cuda.current_device())
        assert routes.route_for(dev).name == "dequant"
        m, g, n = 300, 256, 520
        x, w, bias = _inputs(m, g, n, torch.bfloat16, seed=17 + bits)
        layer = ConvRotLinear.from_float(w, bias, g, bits)
        want = _float(x, layer.dequantize(), bias)
        w4a4 = reference.convrot_linear(x, layer.weight, layer.weight_scale, bias, g, bits) if bits == 4 else None
        gpu = layer.to(dev)  # in place
        xd = x.to(dev)
        for y in (gpu(xd), ops.linear(xd, gpu.weight, gpu.weight_scale, gpu.bias, g, bits),
                  torch.compile(gpu, fullgraph=True)(xd)):
            assert y.device.type == "cuda" and y.dtype == torch.bfloat16
            assert _rel(y.cpu(), want) < TOL[torch.bfloat16], _rel(y.cpu(), want)
        assert ops._routes[(dev, torch.bfloat16, 3 * g, n, g, bits)] is not None  # the per-layer call was the route's
        if bits == 4:  # the tolerance tells the routes apart (8-bit activations lose about bf16's rounding)
            assert _rel(w4a4, want) > TOL[torch.bfloat16]
    finally:
        routes.reset()
