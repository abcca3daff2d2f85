"""The "torchmm" route (convrot/torchmm.py): the reference's W4A4 / W8A8 integer math through torch._int_mm (and,
for 4-bit bf16 layers, torch._scaled_mm on fp8 operands holding the integer codes).

On the CPU the route's own functions run (torch._int_mm and torch._scaled_mm have CPU kernels; the rotation takes
the reference's fp32 matmul there, the tensor-core one is CUDA-only): their output must equal the reference's bit
for bit on the int8 GEMM. The CPU's _scaled_mm applies the scales before it sums (an exact-zero sum comes out as
1e-7), unlike cuBLAS/CUTLASS, so there the fp8 GEMM is checked for its plumbing (layouts, scales, bias) within one
ulp above an fp32-rounding floor; its exactness is the GPU tests' business.

On a GPU (skipped without one) the forced route is compared with the reference on the CPU: a code may differ at a
rounding tie there (the rotation's fp32 sums run in another order), so the output is compared within one ulp with
the reference GEMM of the GPU's own codes, and the codes with the reference's.
"""
from __future__ import annotations

import logging

import pytest
import torch

from convrot import ConvRotLinear, dequant, ops, reference, routes, torchmm

CUDA = torch.cuda.is_available()
FP8_GPU = CUDA and not torch.version.hip and torch.cuda.get_device_capability() >= torchmm.GEMMS["fp8"].cuda_cc


def _cpu_rowwise_fp8_reason() -> str | None:
    """Why this torch cannot run the fp8 GEMM with per-row scales on the CPU (None: it can). torch 2.11's CPU
    _scaled_mm takes per-tensor scales only; the route never runs fp8 on a CPU, the test uses it for the math."""
    a = torch.zeros(2, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(2, 1), torch.ones(1, 2), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        # only that limit: a CPU fp8 GEMM that fails with per-tensor scales too is a failure the tests must show
        torch._scaled_mm(a, a.t(), torch.ones(()), torch.ones(()), out_dtype=torch.bfloat16)
        return f"torch {torch.__version__}: CPU _scaled_mm refuses per-row scales ({str(e).splitlines()[0][:120]})"
    return None


CPU_FP8_SKIP = _cpu_rowwise_fp8_reason()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(m, g, n, dtype, seed, bits):
    """x [m, K = 3 groups of g: not a power of two] with outlier channels, a large row and (m >= 3) an all-zero
    row; the weight's codes and scales; a bias."""
    k = 3 * g
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:3]] *= 50
    x[0] *= 8
    if m >= 3:
        x[2] = 0
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, torch.randint(k, (1,), generator=gen)] *= 10
    w_q, w_s = reference.rotate_quantize(w, g, bits)
    bias = torch.randn(n, generator=gen)
    return x.to(dtype), w_q, w_s, bias.to(dtype)


def _ulps(y, want, floor=0.0):
    """Largest |y - want| in units of the last place of want's dtype at want's magnitude (0 where equal); values
    below `floor` count at `floor`'s ulp."""
    info = torch.finfo(want.dtype)
    w = want.double()
    _, e = torch.frexp(w.abs().clamp_min(max(floor, info.tiny)))  # |want| in [2^(e-1), 2^e)
    ulp = torch.ldexp(torch.full_like(w, info.eps), e - 1)
    return ((y.double() - w).abs() / ulp).max().item()


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("g", [16, 64, 256])
@pytest.mark.parametrize("m, n", [(1, 24), (5, 40), (33, 16)])  # M <= 16 (padded for _int_mm) and M % 8 != 0
def test_int8_gemm_equals_the_reference(m, n, g, bits, has_bias, dtype):
    x, w_q, w_s, bias = _inputs(m, g, n, dtype, seed=m * 1000 + g + bits, bits=bits)
    bias = bias if has_bias else None
    want = reference.convrot_linear(x, w_q, w_s, bias, g, bits)
    fast = torchmm.w4a4_linear if bits == 4 else torchmm.w8a8_linear
    for y in (torchmm.linear(x, w_q, w_s, bias, g, bits), fast(x, w_q, w_s, bias, g),
              torchmm.linear_fn(g, bits)(x, w_q, w_s, bias)):
        assert y.dtype == dtype and y.shape == (m, n)
        assert torch.equal(y, want), _ulps(y, want)


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("g", [16, 64, 256])
@pytest.mark.parametrize("m, n", [(1, 32), (5, 48), (33, 16)])
@pytest.mark.skipif(CPU_FP8_SKIP is not None, reason=str(CPU_FP8_SKIP))
def test_fp8_gemm_is_within_one_ulp_of_the_reference(m, n, g, has_bias):
    x, w_q, w_s, bias = _inputs(m, g, n, torch.bfloat16, seed=m + g, bits=4)
    bias = bias if has_bias else None
    want = reference.convrot_linear(x, w_q, w_s, bias, g, 4)
    y = torchmm.linear(x, w_q, w_s, bias, g, 4, gemm="fp8")
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert _ulps(y, want, floor=2**-16 * want.abs().max().item()) <= 1


def test_the_comparison_can_fail():
    """One weight code off by one, or the weight-only route, is far outside the tolerance above."""
    x, w_q, w_s, bias = _inputs(33, 64, 16, torch.bfloat16, seed=1, bits=4)
    want = reference.convrot_linear(x, w_q, w_s, bias, 64, 4)
    codes = reference.unpack_int4(w_q)
    codes[3, 5] = codes[3, 5] + (1 if codes[3, 5] < 7 else -1)
    off = torchmm.linear(x, reference.pack_int4(codes), w_s, bias, 64, 4)
    assert not torch.equal(off, want) and _ulps(off, want) > 1
    if CPU_FP8_SKIP is None:
        assert _ulps(torchmm.linear(x, reference.pack_int4(codes), w_s, bias, 64, 4, gemm="fp8"), want) > 1
    assert _ulps(dequant.linear(x, w_q, w_s, bias, 64, 4), want) > 1


def test_why_fp8_holds_4_bit_codes_only():
    q4, q8 = reference.QMAX[4], reference.QMAX[8]
    c4 = torch.arange(-q4, q4 + 1, dtype=torch.float32)
    c8 = torch.arange(-q8, q8 + 1, dtype=torch.float32)
    assert torch.equal(c4.to(torch.float8_e4m3fn).float(), c4)
    assert not torch.equal(c8.to(torch.float8_e4m3fn).float(), c8)
    assert torchmm.GEMMS["fp8"].bits == (4,)
    assert 15360 * q4 * q4 < 2**24  # FLUX's largest K: every partial sum of an fp32 accumulator is an exact integer
    assert torchmm.MAX_K * q8 * q8 < 2**31 <= (torchmm.MAX_K + 1) * q8 * q8


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_activation_quantization_is_the_reference(bits, dtype):
    x, _, _, _ = _inputs(7, 64, 8, dtype, seed=13, bits=4)
    got = torchmm.rotate_quantize(x, 64) if bits == 4 else torchmm.rotate_quantize_q8(x, 64)
    want = reference.rotate_quantize(x, 64, bits)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[1][2] > 0  # the all-zero row kept the reference's floor


def test_gemm_choice():
    """fp8 only where its probe passed on the device, for 4-bit bf16 layers whose K and N it takes."""
    dev = torch.device("cuda", 0)
    assert torchmm.gemm_for(dev, torch.bfloat16, 4, 3072, 3072) == torchmm.DEFAULT_GEMM == "int8"
    old = dict(torchmm._gemm_of)
    try:
        torchmm._gemm_of["cuda:0"] = "fp8"
        assert torchmm.gemm_for(dev, torch.bfloat16, 4, 3072, 3072) == "fp8"
        assert torchmm.gemm_for(dev, torch.bfloat16, 8, 3072, 3072) == "int8"
        assert torchmm.gemm_for(dev, torch.float16, 4, 3072, 3072) == "int8"
        assert torchmm.gemm_for(dev, torch.bfloat16, 4, 3072, 3080) == "int8"  # N % 16
        assert torchmm.gemm_for(torch.device("cuda", 1), torch.bfloat16, 4, 3072, 3072) == "int8"
    finally:
        torchmm._gemm_of.clear()
        torchmm._gemm_of.update(old)


def test_supports_shape():
    assert all(torchmm.supports_shape(3 * g, n, g) for g in (16, 64, 256) for n in (8, 24, 3072, None))
    assert not torchmm.supports_shape(3 * 64, 20, 64)         # N % 8: torch._int_mm refuses it
    assert not torchmm.supports_shape(3 * 64 + 16, 24, 64)    # K not a multiple of G
    assert not torchmm.supports_shape(96, 24, 32)             # no such group size
    assert not torchmm.supports_shape(torchmm.MAX_K + 256, 24, 256)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("bits", [4, 8])
def test_traces_as_one_graph(bits, dynamic):
    """Torch ops only, no host sync: torch.compile takes the whole linear, padding branch included, without a
    graph break (aot_eager: no C++ compiler here)."""
    torch._dynamo.reset()
    f = torch.compile(torchmm.w4a4_linear if bits == 4 else torchmm.w8a8_linear, backend="aot_eager",
                      fullgraph=True, dynamic=dynamic)
    for m in (5, 33):
        x, w_q, w_s, bias = _inputs(m, 64, 24, torch.bfloat16, seed=11 + m, bits=bits)
        assert torch.equal(f(x, w_q, w_s, bias, 64), reference.convrot_linear(x, w_q, w_s, bias, 64, bits))


@pytest.mark.skipif(CPU_FP8_SKIP is not None, reason=str(CPU_FP8_SKIP))
def test_fp8_traces_as_one_graph():
    torch._dynamo.reset()
    f = torch.compile(torchmm.linear, backend="aot_eager", fullgraph=True)
    x, w_q, w_s, bias = _inputs(9, 64, 32, torch.bfloat16, seed=5, bits=4)
    assert torch.equal(f(x, w_q, w_s, bias, 64, 4, "fp8"), torchmm.linear(x, w_q, w_s, bias, 64, 4, "fp8"))


# ---- route decisions (CPU: no device needed) ----

OK_EXT = (True, "CUDA extension for sm_90")
NO_EXT = (False, "no CUDA compiler (nvcc) was found")
OK_TRI = (True, "Triton 3.6.0 on sm_90 (NVIDIA H200)")
NO_TRI = (False, "triton is not installed")
OK_MM = (True, "torch._int_mm on sm_90 (NVIDIA H200)")
NO_MM = (False, "sm_70 (Tesla V100) is older than sm_75")


@pytest.mark.parametrize("forced, ext, mm, tri, auto, want, says", [
    (None, OK_EXT, OK_MM, OK_TRI, True, "cuda", []),
    (None, NO_EXT, OK_MM, OK_TRI, True, "torchmm", ["torch._int_mm", "no CUDA compiler"]),   # before Triton
    (None, NO_EXT, NO_MM, OK_TRI, True, "triton", ["older than sm_75"]),
    (None, NO_EXT, NO_MM, NO_TRI, True, "dequant", ["older than sm_75", "triton is not installed"]),
    (None, NO_EXT, OK_MM, NO_TRI, False, "dequant", ["CONVROT_ROUTE=torchmm runs it"]),       # not automatic yet
    ("torchmm", OK_EXT, OK_MM, NO_TRI, False, "torchmm", ["CONVROT_ROUTE=torchmm"]),         # forced past cuda
    ("torchmm", OK_EXT, NO_MM, NO_TRI, False, "dequant", ["CONVROT_ROUTE=torchmm", "older than sm_75"]),
    ("triton", OK_EXT, OK_MM, OK_TRI, True, "triton", ["CONVROT_ROUTE=triton"]),             # after torchmm
    ("cuda", NO_EXT, OK_MM, NO_TRI, True, "torchmm", ["no CUDA compiler"]),
])
def test_decide_with_torchmm(forced, ext, mm, tri, auto, want, says):
    name, why = routes.decide("cuda", forced, ext, tri, triton_automatic=True, torchmm=mm, torchmm_automatic=auto)
    assert name == want, why
    for s in says:
        assert s in why, (s, why)


def test_torchmm_stays_out_of_the_automatic_order_until_measured():
    assert routes.TORCHMM_AUTOMATIC is False  # flip it after bench/torchmm_bench.py and an end-to-end GPU run
    assert routes.decide("cuda", None, NO_EXT, NO_TRI, torchmm=OK_MM)[0] == "dequant"
    assert routes.ROUTES.index("cuda") < routes.ROUTES.index("torchmm") < routes.ROUTES.index("triton")
    assert "torchmm" in routes.COST and "not measured" in routes.COST["torchmm"]


def test_backend_offers_the_api_ops_calls():
    for name in ("supports_shape", "rotate_quantize", "rotate_quantize_q8", "linear_fn", "w4a4_linear",
                 "w8a8_linear"):
        assert callable(getattr(torchmm, name, None)), name


def test_available_says_why_not():
    ok, why = torchmm.available(torch.device("cpu"))
    assert not ok and "cpu tensors" in why
    if not CUDA:
        ok, why = torchmm.available(torch.device("cuda", 0))
        assert not ok and "no GPU visible" in why


NO_GPU = pytest.mark.skipif(CUDA, reason="a machine without a GPU: there a CUDA device has no compiled route")


def _route_line(caplog, monkeypatch, forced):
    routes.reset()
    monkeypatch.setenv(routes.ENV, forced)
    with caplog.at_level(logging.INFO, logger="convrot"):
        r = routes.route_for(torch.device("cuda", 0))
    routes.reset()
    return r, [rec for rec in caplog.records if rec.getMessage().startswith("ConvRot on cuda:0")]


@NO_GPU
def test_forced_torchmm_without_a_gpu_falls_to_dequant_and_says_why(caplog, monkeypatch):
    r, recs = _route_line(caplog, monkeypatch, "torchmm")
    assert r.name == "dequant" and len(recs) == 1
    line = recs[0].getMessage()
    assert "CONVROT_ROUTE=torchmm" in line and "torchmm: no GPU visible" in line


@NO_GPU
def test_forced_torchmm_is_the_backend_when_available(caplog, monkeypatch):
    """CONVROT_ROUTE=torchmm: the extension is never tried (a build can take minutes), the module is the backend,
    the log line says so at info level with the route's cost."""
    def never(device):
        raise AssertionError("the extension was tried")
    monkeypatch.setattr(routes, "_cuda_extension", never)
    monkeypatch.setattr(torchmm, "available", lambda device: OK_MM)
    r, recs = _route_line(caplog, monkeypatch, "torchmm")
    assert (r.name, r.backend) == ("torchmm", torchmm) and len(recs) == 1
    assert recs[0].levelno == logging.INFO and routes.COST["torchmm"] in recs[0].getMessage()


# ---- on a GPU: the real route ----

GPU = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def forced_torchmm(monkeypatch):
    monkeypatch.setenv(routes.ENV, "torchmm")
    routes.reset()
    dev = torch.device("cuda", torch.cuda.current_device())
    r = routes.route_for(dev)
    assert r.name == "torchmm", r.why
    yield dev
    routes.reset()


def _gpu_check(x, w_q, w_s, bias, g, bits, y, dev):
    """y (the route's output on the GPU) against the reference: the codes of the GPU's rotate+quantize equal the
    reference's but for rounding ties, and y is within one ulp of the reference GEMM of those codes. An epilogue
    rounding its fp32 products in another order (cuBLAS's for fp8, Inductor's FMAs) moves an output that the bias
    nearly cancels by more than its own ulp, so ulps count above a floor of 2^-16 of the largest output."""
    xd = x.to(dev)
    a, a_s = torchmm.quantize(torchmm.rotate(xd, g), bits)
    ra, ra_s = reference.quantize_rows(reference.rotate(x, g), bits)
    diff = (a.cpu().int() - ra.int()).abs()
    assert diff.max() <= 1 and (diff != 0).float().mean() < 1e-3, (diff != 0).float().mean()
    assert torch.allclose(a_s.cpu(), ra_s, rtol=1e-6, atol=0)
    own = a.cpu() if bits == 8 else reference.pack_int4(a.cpu())
    want_own = reference.quantized_gemm(own, a_s.cpu(), w_q, w_s, bias, x.dtype, bits)
    floor = 2**-16 * want_own.abs().max().item()
    assert _ulps(y.cpu(), want_own, floor) <= 1, _ulps(y.cpu(), want_own, floor)
    want = reference.convrot_linear(x, w_q, w_s, bias, g, bits)
    rel = ((y.cpu().double() - want.double()).norm() / want.double().norm()).item()
    assert rel < 1e-2, rel


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("g", [16, 64, 256])
@pytest.mark.parametrize("m, n", [(1, 3072), (16, 40), (17, 40), (333, 520)])
def test_gpu_route_matches_the_reference(m, n, g, bits, dtype, forced_torchmm):
    dev = forced_torchmm
    x, w_q, w_s, bias = _inputs(m, g, n, dtype, seed=m + g + bits, bits=bits)
    fast = torchmm.w4a4_linear if bits == 4 else torchmm.w8a8_linear
    for b in (bias, None):
        bd = None if b is None else b.to(dev)
        y = fast(x.to(dev), w_q.to(dev), w_s.to(dev), bd, g)
        assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (m, n)
        _gpu_check(x, w_q, w_s, b, g, bits, y, dev)


@GPU
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_layer_checked_call_and_compiled_block(bits, forced_torchmm):
    """A ConvRotLinear (the cached per-layer call), ops.linear (the checked call) and the layer under torch.compile
    (Inductor, as Compile Blocks) all give the reference's result."""
    dev = forced_torchmm
    m, g, n, k = 300, 256, 520, 3072
    gen = torch.Generator().manual_seed(17 + bits)
    x = torch.randn(2, m // 2, k, generator=gen)
    x[..., 7] *= 50
    x = x.to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    layer = ConvRotLinear.from_float(w, bias, g, bits)
    want = reference.convrot_linear(x, layer.weight, layer.weight_scale, bias, g, bits)
    gpu = layer.to(dev)
    xd = x.to(dev)
    torch._dynamo.reset()
    for y in (gpu(xd), ops.linear(xd, gpu.weight, gpu.weight_scale, gpu.bias, g, bits),
              torch.compile(gpu, fullgraph=True)(xd)):
        assert y.dtype == torch.bfloat16 and y.shape == (2, m // 2, n)
        rel = ((y.cpu().double() - want.double()).norm() / want.double().norm()).item()
        assert rel < 1e-2, rel
    assert ops._routes[(dev, torch.bfloat16, k, n, g, bits)] is not None  # the per-layer call was the route's


@GPU
@pytest.mark.skipif(not FP8_GPU, reason="the fp8 GEMM needs an NVIDIA GPU of sm_89 or newer")
@pytest.mark.parametrize("m", [1, 77, 4096])
def test_gpu_fp8_gemm_is_exact_at_fluxs_largest_k(m):
    """K = 15360 (FLUX's largest) with codes of +-7. Row 0 of the weight sums to 376,320 over its first half and
    cancels that over the second, leaving 147: an accumulator that drops low bits of a large partial sum (fp8 fast
    accumulation keeps about 14) is off by tens there. With unit scales the fp8 GEMM, in bf16 as the route calls it
    and in fp32 where cuBLAS offers that, must equal bf16/fp32 of torch._int_mm's exact sums; the route's output
    must be within one ulp of its int8 GEMM's."""
    k, n, dev = 15360, 256, torch.device("cuda")
    gen = torch.Generator().manual_seed(m)
    a = torch.randint(-7, 8, (m, k), generator=gen, dtype=torch.int8)
    a[0] = 7
    w = torch.randint(-7, 8, (n, k), generator=gen, dtype=torch.int8)
    w[0, : k // 2] = 7
    w[0, k // 2:] = -7
    w[0, -3:] = 0
    w[1] = 7
    a, w = a.to(dev), w.to(dev)
    exact = torchmm.int_mm(a, w)
    assert exact[0, 0].item() == 147 and exact[0, 1].item() == k * 49
    a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    ones_a, ones_w = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    for out_dtype in (torch.bfloat16, torch.float32):
        try:
            y = torch._scaled_mm(a8, w8.t(), ones_a, ones_w, out_dtype=out_dtype, use_fast_accum=False)
        except RuntimeError:
            assert out_dtype == torch.float32  # row-wise scaling writes bf16 only on the CUTLASS path
            continue
        assert torch.equal(y, exact.to(out_dtype)), (y[0, :2], exact[0, :2])
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(dev)
    w_q = reference.pack_int4(w)
    w_s = torch.rand(n, generator=gen).to(dev) * 0.01 + 1e-3
    y8 = torchmm.linear(x, w_q, w_s, None, 256, 4, gemm="fp8")
    yi = torchmm.linear(x, w_q, w_s, None, 256, 4, gemm="int8")
    assert _ulps(y8.cpu(), yi.cpu()) <= 1


@GPU
@pytest.mark.skipif(not FP8_GPU, reason="the fp8 GEMM needs an NVIDIA GPU of sm_89 or newer")
def test_gpu_fp8_route_when_asked(monkeypatch):
    monkeypatch.setenv(routes.ENV, "torchmm")
    monkeypatch.setenv(torchmm.GEMM_ENV, "fp8")
    routes.reset()
    torchmm._probed.clear()
    try:
        dev = torch.device("cuda", torch.cuda.current_device())
        r = routes.route_for(dev)
        assert r.name == "torchmm" and "fp8 (torch._scaled_mm)" in r.why, r.why
        assert torchmm.gemm_for(dev, torch.bfloat16, 4, 3072, 3072) == "fp8"
        for m, g in ((1, 64), (77, 256), (300, 16)):
            x, w_q, w_s, bias = _inputs(m, g, 3072, torch.bfloat16, seed=m, bits=4)
            y = torchmm.w4a4_linear(x.to(dev), w_q.to(dev), w_s.to(dev), bias.to(dev), g)
            _gpu_check(x, w_q, w_s, bias, g, 4, y, dev)
    finally:
        torchmm._gemm_of.clear()
        routes.reset()
