"""GPU tests of the CUDA kernels against convrot.reference (skipped without a CUDA GPU or a usable build).

Every check draws fresh random inputs with outlier channels (x100) and rows with a large common offset,
and poisons the caching allocator first so that an element the kernel fails to write shows up.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from convrot import reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def K_():
    from convrot import kernels

    if not kernels.available(torch.device("cuda")):
        pytest.skip(f"convrot CUDA kernels not available: {kernels.unavailable_reason()}")
    return kernels


def _gen(seed):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return g


def make_act(m, k, dtype, seed):
    """Activation-like data: gaussian, a few outlier channels x100, a few rows with a large common offset."""
    g = _gen(seed)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.float32)
    cols = torch.randint(0, k, (max(1, k // 512),), device="cuda", generator=g)
    x[:, cols] *= 100.0
    if m > 1:
        rows = torch.randint(0, m, (max(1, m // 8),), device="cuda", generator=g)
        x[rows] += 40.0
    return x.to(dtype)


def poison(*nbytes_list, byte=0x7F):
    """Fill blocks of the given sizes with `byte` and free them: the next allocations of those sizes reuse them."""
    blocks = [torch.full((n,), byte, dtype=torch.uint8, device="cuda") for n in nbytes_list]
    torch.cuda.synchronize()
    del blocks


def poison_nan(*numels):
    blocks = [torch.full((n,), float("nan"), dtype=torch.float32, device="cuda") for n in numels]
    torch.cuda.synchronize()
    del blocks


def assert_codes_close(ours_packed, ref_packed):
    a = reference.unpack_int4(ours_packed).to(torch.int16)
    b = reference.unpack_int4(ref_packed).to(torch.int16)
    d = (a - b).abs()
    n = d.numel()
    assert int(d.max()) <= 1, f"code differs by {int(d.max())}"
    bad = int((d != 0).sum())
    assert bad <= max(2, int(1e-3 * n)), f"{bad} of {n} codes differ by 1 (allowed: 0.1%)"


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("G", [16, 64, 256])
@pytest.mark.parametrize("m,k", [(1, 256), (7, 3072), (513, 1024), (64, 15360), (3, 20480), (2, 40960)])
def test_rotate_quantize(K_, dtype, G, m, k):
    x = make_act(m, k, dtype, seed=zlib.crc32(f'{dtype}{G}{m}{k}'.encode()) & 0xFFFF)
    poison(m * k // 2)
    poison_nan(m)
    q, s = K_.rotate_quantize(x, G)
    q_ref, s_ref = reference.rotate_quantize(x, G)
    assert q.shape == (m, k // 2) and q.dtype == torch.int8 and s.shape == (m,) and s.dtype == torch.float32
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert_codes_close(q, q_ref)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", [16, 64, 256])
def test_rotate_quantize_int8_codes(K_, dtype, G):
    m, k = 513, 3072
    x = make_act(m, k, dtype, seed=11 + G)
    poison(m * k)
    q8, s8 = K_.rotate_quantize_int8_codes(x, G)
    assert int(q8.abs().max()) <= 7, "unwritten (poisoned 0x7f) or out-of-range int8 codes"
    q4, s4 = K_.rotate_quantize(x, G)
    # Same kernel body, two output formats: identical codes and scales.
    assert torch.equal(s8, s4)
    assert torch.equal(q8, reference.unpack_int4(q4))


@cuda
def test_zero_and_constant_rows(K_):
    x = torch.zeros(5, 1024, device="cuda", dtype=torch.bfloat16)
    x[1] = 3.0
    x[2, 7] = -1e4
    q, s = K_.rotate_quantize(x, 256)
    q_ref, s_ref = reference.rotate_quantize(x, 256)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert_codes_close(q, q_ref)


@cuda
@pytest.mark.parametrize("m,k,n", [(1, 256, 8), (513, 3072, 264), (64, 15360, 520)])
def test_fused_act_and_weight_unpack(K_, m, k, n):
    x = make_act(m, k, torch.bfloat16, seed=m + k)
    w = _rand_packed(n, k, seed=n)
    poison(m * k, n * k)
    a8, s8, w8 = torch.ops.convrot.rotate_quantize_i8_unpack(x, 256, w)
    a_ref, s_ref = K_.rotate_quantize_int8_codes(x, 256)
    assert torch.equal(a8, a_ref) and torch.equal(s8, s_ref)
    assert torch.equal(w8, reference.unpack_int4(w))


@cuda
def test_unpack_int4(K_):
    g = _gen(3)
    p = torch.randint(-128, 128, (257, 3072 // 2), device="cuda", generator=g, dtype=torch.int8)
    poison(p.numel() * 2)
    assert torch.equal(K_.unpack_int4(p), reference.unpack_int4(p))


def _rand_packed(rows, k, seed):
    """Random packed codes over the full nibble range, -8 included (a checkpoint may hold it)."""
    g = _gen(seed)
    return torch.randint(-128, 128, (rows, k // 2), device="cuda", generator=g, dtype=torch.int8)


def _routes(K_):
    r = ["s4"]
    if torch.cuda.get_device_capability() == (9, 0):
        r += ["sm90:0", "sm90:1", "sm90:2"]
    return r


@cuda
@pytest.mark.parametrize("m,n,k", [(1, 8, 64), (7, 136, 192), (513, 264, 3072), (130, 520, 15360), (256, 256, 1024)])
def test_gemm_int32_exact(K_, m, n, k):
    a = _rand_packed(m, k, seed=m * 7 + k)
    w = _rand_packed(n, k, seed=n * 13 + k)
    ref = reference.int_matmul(reference.unpack_int4(a), reference.unpack_int4(w))
    assert float(ref.abs().max()) < 2**24  # fp32 holds the reference accumulator exactly
    ref = ref.to(torch.int32)
    for route in _routes(K_):
        name, _, cfg = route.partition(":")
        poison_nan(m * n)
        acc = K_.gemm_int32(a, w, route=name, config=int(cfg or -1))
        assert torch.equal(acc, ref), f"{route}: {(acc != ref).sum().item()} of {ref.numel()} accumulators differ"


@cuda
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m", [1, 7, 513])
def test_gemm_epilogue(K_, out_dtype, with_bias, m):
    n, k = 384, 3072
    a = _rand_packed(m, k, seed=m + 1)
    w = _rand_packed(n, k, seed=m + 2)
    g = _gen(m + 3)
    a_scale = torch.rand(m, device="cuda", generator=g) * 0.1 + 1e-3
    w_scale = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-4
    bias = (torch.randn(n, device="cuda", generator=g) * 3).to(out_dtype) if with_bias else None
    ref = reference.quantized_gemm(a, a_scale, w, w_scale, bias, torch.float32)
    eps = torch.finfo(out_dtype).eps
    tol = dict(rtol=eps, atol=eps * float(ref.abs().max()) * 1e-3)
    for route in _routes(K_):
        name, _, cfg = route.partition(":")
        poison(m * n * 2, byte=0xFF)  # 0xFFFF is NaN in both bf16 and fp16
        if name == "s4":
            out = K_.gemm_s4_mma(a, a_scale, w, w_scale, bias, out_dtype)
        else:
            out = K_.w4a4_gemm(a, a_scale, w, w_scale, bias, out_dtype, config=int(cfg))
        assert out.dtype == out_dtype and out.shape == (m, n)
        assert torch.isfinite(out).all(), f"{route}: unwritten outputs"
        # One rounding of the output type: the fp32 epilogue may contract a multiply-add differently.
        torch.testing.assert_close(out.float(), ref.to(out_dtype).float(), **tol, msg=lambda s: f"{route}: {s}")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", [16, 64, 256])
@pytest.mark.parametrize("m", [1, 7, 513])
def test_linear_vs_reference(K_, dtype, G, m):
    n, k = 256, 3072
    x = make_act(m, k, dtype, seed=m * 31 + G)
    g = _gen(G + m)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float32).to(dtype) * 0.05
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    w_q, w_s = K_.rotate_quantize(w, G)  # weight quantization on the GPU: the same op
    w_q_ref, w_s_ref = reference.rotate_quantize(w, G)
    torch.testing.assert_close(w_s, w_s_ref, rtol=1e-5, atol=0)
    assert_codes_close(w_q, w_q_ref)

    poison(m * n * 2, byte=0xFF)
    out = K_.w4a4_linear(x, w_q, w_s, bias, G)
    assert out.dtype == dtype and out.shape == (m, n) and torch.isfinite(out).all()
    # Split the comparison where the arithmetic splits. (1) Activation codes: ties of the fp32 rotation may move
    # a few codes by one step, and with outlier channels most codes are near 0, so one flipped code can move a
    # whole output row by a few percent: compare codes, not outputs.
    a_q, a_s = K_.rotate_quantize(x, G)
    a_q_ref, a_s_ref = reference.rotate_quantize(x, G)
    torch.testing.assert_close(a_s, a_s_ref, rtol=1e-5, atol=0)
    assert_codes_close(a_q, a_q_ref)
    # (2) Given the codes, the output is the reference's GEMM and epilogue up to one rounding of the output type.
    ref = reference.quantized_gemm(a_q, a_s, w_q, w_s, bias, torch.float32)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=eps, atol=eps * float(ref.abs().max()) * 1e-3)
    # (3) Sanity against the whole reference op.
    full = reference.convrot_linear(x, w_q, w_s, bias, G)
    rel = float((out.float() - full.float()).norm() / full.float().norm())
    assert rel < 5e-2, rel
    # The opt-in int8 weight cache computes the same thing bit for bit.
    out2 = K_.w4a4_linear(x, K_.prepare_weight(w_q), w_s, bias, G)
    assert torch.equal(out, out2)
    # And so does the linear built from the public pieces.
    out3 = K_.w4a4_gemm(a_q, a_s, w_q, w_s, bias, dtype)
    assert torch.equal(out, out3)


@cuda
def test_errors(K_):
    x = torch.randn(4, 100, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        K_.rotate_quantize(x, 16)
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group_size"):
        K_.rotate_quantize(x, 32)
    with pytest.raises(ValueError, match="group_size=256"):
        K_.rotate_quantize(x, 256)
    with pytest.raises(ValueError, match="contiguous"):
        K_.rotate_quantize(torch.randn(128, 8, device="cuda").t(), 64)
    assert not K_.available(torch.device("cpu"))


@cuda
def test_cuda_graph_and_compile(K_):
    m, n, k, G = 64, 256, 1024, 64
    x = make_act(m, k, torch.bfloat16, seed=5)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    w_q, w_s = K_.rotate_quantize(w, G)
    bias = torch.randn(n, device="cuda", dtype=torch.float32)
    eager = K_.w4a4_linear(x, w_q, w_s, bias, G)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        K_.w4a4_linear(x, w_q, w_s, bias, G)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = K_.w4a4_linear(x, w_q, w_s, bias, G)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_g, eager)

    f = torch.compile(lambda a: K_.w4a4_linear(a, w_q, w_s, bias, G), fullgraph=True)
    assert torch.equal(f(x), eager)

    # Every sm_90 tile configuration (stream-K initializes a workspace) must be capturable too.
    if torch.cuda.get_device_capability() == (9, 0):
        for cfg in (0, 1, 2):
            ref = K_.w4a4_linear(x, w_q, w_s, bias, G, config=cfg)
            with torch.cuda.stream(s):
                K_.w4a4_linear(x, w_q, w_s, bias, G, config=cfg)
            torch.cuda.current_stream().wait_stream(s)
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2):
                o2 = K_.w4a4_linear(x, w_q, w_s, bias, G, config=cfg)
            g2.replay()
            torch.cuda.synchronize()
            assert torch.equal(o2, ref), cfg


@cuda
def test_fake_kernels(K_):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(9, 512, device="cuda", dtype=torch.float16)
        q, s = torch.ops.convrot.rotate_quantize(x, 64)
        assert q.shape == (9, 256) and s.shape == (9,)
        q8, _ = torch.ops.convrot.rotate_quantize_i8(x, 64)
        assert q8.shape == (9, 512)
        w4 = torch.empty(16, 256, device="cuda", dtype=torch.int8)
        a8, s8, w8 = torch.ops.convrot.rotate_quantize_i8_unpack(x, 64, w4)
        assert a8.shape == (9, 512) and s8.shape == (9,) and w8.shape == (16, 512)
        w = torch.empty(24, 256, device="cuda", dtype=torch.int8)
        out = torch.ops.convrot.gemm_s4_mma(q, s, w, torch.empty(24, device="cuda"), None, torch.float16)
        assert out.shape == (9, 24) and out.dtype == torch.float16


def assert_int8_codes_close(ours, ref):
    d = (ours.to(torch.int16) - ref.to(torch.int16)).abs()
    assert int(d.max()) <= 1, f"code differs by {int(d.max())}"
    bad = int((d != 0).sum())
    assert bad <= max(2, int(1e-3 * d.numel())), f"{bad} of {d.numel()} codes differ by 1 (allowed: 0.1%)"


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("G", [16, 64, 256])
@pytest.mark.parametrize("m,k", [(1, 256), (7, 3072), (513, 1024), (64, 15360)])
def test_rotate_quantize_q8(K_, dtype, G, m, k):
    """W8A8: the same rotation with int8 codes in [-127, 127]."""
    x = make_act(m, k, dtype, seed=zlib.crc32(f'q8{dtype}{G}{m}{k}'.encode()) & 0xFFFF)
    poison(m * k, byte=0x80)  # -128: never a valid code
    poison_nan(m)
    q, s = K_.rotate_quantize_q8(x, G)
    q_ref, s_ref = reference.rotate_quantize(x, G, bits=8)
    assert q.shape == (m, k) and q.dtype == torch.int8 and int(q.min()) >= -127
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert_int8_codes_close(q, q_ref)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 513])
def test_w8a8_linear_vs_reference(K_, dtype, m):
    n, k, G = 264, 3072, 256
    x = make_act(m, k, dtype, seed=m * 17 + 3)
    g = _gen(m + 99)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float32).to(dtype) * 0.05
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    w_q, w_s = K_.rotate_quantize_q8(w, G)
    w_q_ref, w_s_ref = reference.rotate_quantize(w, G, bits=8)
    torch.testing.assert_close(w_s, w_s_ref, rtol=1e-5, atol=0)
    assert_int8_codes_close(w_q, w_q_ref)
    poison(m * n * 2, byte=0xFF)
    out = K_.w8a8_linear(x, w_q, w_s, bias, G)
    assert out.dtype == dtype and out.shape == (m, n) and torch.isfinite(out).all()
    a_q, a_s = K_.rotate_quantize_q8(x, G)
    ref = reference.quantized_gemm(a_q, a_s, w_q, w_s, bias, torch.float32, bits=8)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=eps, atol=eps * float(ref.abs().max()) * 1e-3)
    full = reference.convrot_linear(x, w_q, w_s, bias, G, bits=8)
    assert float((out.float() - full.float()).norm() / full.float().norm()) < 1e-2


@cuda
def test_dispatch_uses_kernels_and_falls_back_by_shape(K_):
    """convrot.ops picks the kernels for supported shapes and the reference path (not an error) otherwise."""
    from convrot import ops
    for bits in (4, 8):
        w = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16) * 0.05
        w_q, w_s = ops.quantize_weight(w, 256, bits)
        x = make_act(9, 1024, torch.bfloat16, seed=bits)
        out = ops.linear(x, w_q, w_s, None, 256, bits)
        full = reference.convrot_linear(x, w_q, w_s, None, 256, bits)
        assert float((out.float() - full.float()).norm() / full.float().norm()) < 5e-2
    w = torch.randn(12, 1024, device="cuda", dtype=torch.bfloat16)  # N = 12: outside the kernels (N % 8)
    w_q, w_s = ops.quantize_weight(w, 256, 4)
    x = make_act(5, 1024, torch.bfloat16, seed=7)
    out = ops.linear(x, w_q, w_s, None, 256, 4)
    assert torch.equal(out, reference.convrot_linear(x, w_q, w_s, None, 256))


@cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cached_fast_path_matches_checked_path(K_, bits, dtype):
    """ops.qlinear (what ConvRotLinear, the ComfyUI layers and the QuantizedTensor dispatch call) decides its kernel
    call once per shape (ops.fast_linear_fn) and then skips the per-call checks: it must compute exactly what the
    checked entry point computes, for 3-D, non-contiguous and empty inputs alike."""
    from convrot import ops
    from convrot.linear import ConvRotLinear
    n, k, G = 520, 3072, 256
    g = _gen(bits * 7 + (dtype == torch.float16))
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float32).to(dtype) * 0.05
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    layer = ConvRotLinear.from_float(w, bias, G, bits)
    assert ops.fast_linear_fn(torch.device("cuda", torch.cuda.current_device()), dtype, k, n, G, bits) is not None
    checked = K_.w4a4_linear if bits == 4 else K_.w8a8_linear
    x = make_act(2 * 77, k, dtype, seed=bits + 5).reshape(2, 77, k)
    poison(2 * 77 * n * 2, byte=0xFF)
    out = layer(x)
    dev = torch.device("cuda", torch.cuda.current_device())
    assert ops._routes.get((dev, dtype, k, n, G, bits)) is not None  # the cached route was taken
    assert out.shape == (2, 77, n) and out.dtype == dtype
    assert torch.equal(out.reshape(-1, n), checked(x.reshape(-1, k), layer.weight, layer.weight_scale, bias, G))
    xt = make_act(k, 33, dtype, seed=bits + 6).t()  # non-contiguous [33, k]
    assert torch.equal(layer(xt), checked(xt.contiguous(), layer.weight, layer.weight_scale, bias, G))
    assert layer(x[:, :0]).shape == (2, 0, n)
    # a shape outside the kernels (N % 8 != 0) gets no cached call and uses the reference path
    odd = ConvRotLinear.from_float(w[:12], bias[:12], G, bits)
    y = odd(x)
    assert (dev, dtype, k, 12, G, bits) in ops._routes and ops._routes[(dev, dtype, k, 12, G, bits)] is None
    assert torch.equal(y, reference.convrot_linear(x, odd.weight, odd.weight_scale, bias[:12], G, bits))
