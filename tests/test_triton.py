"""The Triton route (convrot/triton_kernels.py) against convrot/reference.py.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set only while the kernels module
is imported, then restored) on small shapes; with CUDA they are compiled and also run on FLUX-sized shapes.
Skips when triton is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from convrot import reference as ref
from convrot import triton_kernels as tk

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -r requirements-dev.txt)")

DEV = "cuda" if CUDA else "cpu"
# per group size, a K that is not a multiple of the kernels' 256-wide K blocks (tail masks) where G allows it
K_OF = {16: 208, 64: 320, 256: 512}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """Load the kernels: compiled on CUDA, interpreted on the CPU. TRITON_INTERPRET stays set while this module's
    tests run (triton imports parts of itself lazily and checks it then) and is restored afterwards."""
    if not HAS_TRITON:
        yield None
        return
    old = os.environ.get("TRITON_INTERPRET")
    old_autotune = tk.AUTOTUNE
    tk.AUTOTUNE = False  # one block config per kernel variant (compiles dominate on CUDA); see test_autotuned_*
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        jit = tk._jit()
        if jit.INTERPRET == CUDA:
            pytest.skip("the kernels module was imported earlier with the other TRITON_INTERPRET setting")
        yield jit
    finally:
        tk.AUTOTUNE = old_autotune
        if not CUDA:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def _acts(m, k, dtype, seed, outlier=50.0, big_row=30.0):
    """Activations with outlier channels (x50 on a few), one large row and one all-zero row when m allows
    (sized so fp16 neither overflows in x nor in y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= outlier
    if m > 2:
        x[1] *= big_row
        x[2] = 0.0
    return x.to(DEV, dtype)


def _assert_codes_close(got, want, bits):
    """Equal codes, except a rare rounding tie (off by one) from another fp32 summation order."""
    gc, wc = ref.codes_of(got, bits).to(torch.int32), ref.codes_of(want, bits).to(torch.int32)
    diff = (gc - wc).abs()
    assert diff.max().item() <= 1, f"codes differ by {diff.max().item()}"
    assert (diff != 0).sum().item() <= max(2, diff.numel() // 10000), f"{(diff != 0).sum().item()} codes differ"


def _poisoned_codes(shape):
    # -128 (0x80) is no code and no packed byte of codes in [-7, 7] (its high nibble would be -8)
    return torch.full(shape, -128, device=DEV, dtype=torch.int8)


@pytest.mark.parametrize("rq", tk.RQ_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, 64, 256])
def test_rotate_quantize_matches_reference(group_size, bits, dtype, rq):
    """Every rotate+quantize method: the reference's codes and scales, every output byte written."""
    m, k = (333, 3 * 1024) if CUDA else (17, K_OF[group_size])
    x = _acts(m, k, dtype, seed=group_size + bits)
    cols = k // 2 if bits == 4 else k
    q = _poisoned_codes((m, cols))
    s = torch.full((m,), float("nan"), device=DEV)
    q2, s2 = tk.rotate_quantize(x, group_size, bits, out=q, scale_out=s, rq=rq)
    assert q2 is q and s2 is s
    assert (q != -128).all(), "unwritten code bytes"
    qr, sr = ref.rotate_quantize(x, group_size, bits)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, sr, rtol=2e-6, atol=0)
    _assert_codes_close(q, qr, bits)


@pytest.mark.parametrize("m", [1, 333])
def test_rotate_quantize_odd_rows_and_unpacked_codes(m):
    x = _acts(m, 320, torch.bfloat16, seed=m)
    q, s = tk.rotate_quantize(x, 64, 4, packed=False)
    assert q.shape == (m, 320) and q.dtype == torch.int8
    qr, sr = ref.rotate_quantize(x, 64, 4)
    torch.testing.assert_close(s, sr, rtol=2e-6, atol=0)
    _assert_codes_close(ref.pack_int4(q), qr, 4)
    assert q.abs().max().item() <= 7


@pytest.mark.parametrize("rq", tk.RQ_KERNELS)
@pytest.mark.parametrize("group_size", [16, 64, 256])
def test_rotate_quantize_fp32_weights(group_size, rq):
    """fp32 input (offline weight quantization): the dot method's three-piece bf16 split keeps fp32 accuracy
    (the fwht / row methods add in fp32)."""
    w = _acts(24, K_OF[group_size], torch.float32, seed=7)
    q, s = tk.rotate_quantize(w, group_size, 4, rq=rq)
    qr, sr = ref.rotate_quantize(w, group_size, 4)
    torch.testing.assert_close(s, sr, rtol=2e-6, atol=0)
    _assert_codes_close(q, qr, 4)


def _codes(n, k, qmax, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-qmax, qmax + 1, (n, k), generator=g, dtype=torch.int8).to(DEV)


@pytest.mark.parametrize("a_fmt,w_fmt", [("int8", "int8"), ("int8", "packed"), ("packed", "packed"),
                                         ("packed", "int8")])
@pytest.mark.parametrize("m", [1, 17])
def test_gemm_exact_accumulator_and_epilogue(a_fmt, w_fmt, m):
    k, n = (3072, 3072) if CUDA else (192, 72)  # 192: K tail (not a multiple of the 128-wide K block)
    m = m if not CUDA else m * 61
    qmax = 127 if (a_fmt, w_fmt) == ("int8", "int8") else 7
    ac, wc = _codes(m, k, qmax, 1), _codes(n, k, qmax, 2)
    a = ref.pack_int4(ac) if a_fmt == "packed" else ac
    w = ref.pack_int4(wc) if w_fmt == "packed" else wc
    # unit scales, fp32 out: the int32 accumulator itself (exact: |acc| < 2^24)
    ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
    out = torch.full((m, n), float("nan"), device=DEV)
    acc = tk.gemm(a, ones_m, w, ones_n, None, torch.float32, k=k, out=out)
    assert acc is out
    exact = ref.int_matmul(ac, wc, qmax + 1)  # int32, exact
    assert torch.equal(acc, exact.to(torch.float32))  # the same int32 -> fp32 rounding (|acc| may pass 2^24)
    if w_fmt == "packed":  # the packed_x16 unpack of the weight (K tail included): the same sums
        assert torch.equal(tk.gemm(a, ones_m, w, ones_n, None, torch.float32, k=k, x16=True), acc)
    # real scales and bias in each output dtype: bit-equal to the reference's fp32 epilogue
    g = torch.Generator().manual_seed(3)
    a_s = (torch.rand(m, generator=g) + 0.01).to(DEV) * 1e-2
    w_s = (torch.rand(n, generator=g) + 0.01).to(DEV) * 1e-2
    bits = 8 if qmax == 127 else 4
    for dt in (torch.bfloat16, torch.float16):
        bias = torch.randn(n, generator=g).to(DEV, dt)
        y = torch.full((m, n), float("nan"), device=DEV, dtype=dt)
        tk.gemm(a, a_s, w, w_s, bias, dt, k=k, out=y)
        want = ref.quantized_gemm(ac if bits == 8 else ref.pack_int4(ac), a_s,
                                  wc if bits == 8 else ref.pack_int4(wc), w_s, bias, dt, bits)
        assert torch.isfinite(y).all()
        assert torch.equal(y, want)  # no FMA contraction in the kernels: the same fp32 roundings


def _weights(n, k, group_size, bits, seed):
    w = _acts(n, k, torch.float32, seed, outlier=10.0, big_row=3.0) * 0.05
    return ref.rotate_quantize(w, group_size, bits)


def _assert_linear_close(y, want):
    assert y.dtype == want.dtype and y.shape == want.shape
    assert torch.isfinite(y).all()
    y, want = y.float(), want.float()
    scale = want.abs().amax().clamp_min(1e-6)
    err = (y - want).abs().amax() / scale
    # codes equal up to rare ties, so outputs equal up to a tie's worth plus one rounding of the output dtype
    assert err.item() < 2e-2, f"max error {err.item():.3g} of max |y|"
    assert (y == want).float().mean().item() > (0.95 if CUDA else 0.999)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, 64, 256])
def test_linear_matches_reference(group_size, bits, dtype):
    m, k, n = (333, 3072, 3072 + 8) if CUDA else (17, K_OF[group_size], 40)
    x = _acts(m, k, dtype, seed=11 + group_size)
    w_q, w_s = _weights(n, k, group_size, bits, seed=5)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV, dtype)  # seeded: a fixed test
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
    y = tk.linear(x, w_q, w_s, bias, group_size, bits, out=out)
    assert y is out
    _assert_linear_close(y, ref.convrot_linear(x, w_q, w_s, bias, group_size, bits))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 17] + ([4096] if CUDA else []))
def test_linear_fn_contract(bits, m):
    """linear_fn(G, bits) -> f(x2d, w, w_scale, bias): the extension's contract; packed and prepared W4."""
    k, n, g = (3072, 9216, 256) if CUDA else (256, 24, 64)
    x = _acts(m, k, torch.bfloat16, seed=m)
    w_q, w_s = _weights(n, k, g, bits, seed=9)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV, torch.bfloat16)
    f = tk.linear_fn(g, bits)
    want = ref.convrot_linear(x, w_q, w_s, bias, g, bits)
    _assert_linear_close(f(x, w_q, w_s, bias), want)
    _assert_linear_close(f(x, w_q, w_s, None), ref.convrot_linear(x, w_q, w_s, None, g, bits))
    if bits == 4:
        _assert_linear_close(f(x, tk.prepare_weight(w_q), w_s, bias), want)
    assert f(x[:0], w_q, w_s, bias).shape == (0, n)


@pytest.mark.parametrize("bits", [4, 8])
def test_autotuned_linear_fn(bits, monkeypatch):
    """The production path: autotuned block configs (on the CPU the interpreter always uses the fixed one)."""
    monkeypatch.setattr(tk, "AUTOTUNE", True)
    m, k, n, g = (4096, 3072, 9216, 256) if CUDA else (17, 256, 24, 256)
    x = _acts(m, k, torch.bfloat16, seed=21)
    w_q, w_s = _weights(n, k, g, bits, seed=22)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV, torch.bfloat16)
    _assert_linear_close(tk.linear_fn(g, bits)(x, w_q, w_s, bias), ref.convrot_linear(x, w_q, w_s, bias, g, bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_route_adapter_calls_the_kernels_as_ops_expects(bits):
    """convrot/routes.py's Triton backend: each entry point of the API convrot/ops.py calls gives the reference's
    result (a swapped argument or a wrong bit width in the adapter would not)."""
    from convrot import routes
    b = routes._Triton(tk)
    m, k, n, g = (257, 3072, 3072 + 8, 256) if CUDA else (7, 320, 24, 64)
    x = _acts(m, k, torch.bfloat16, seed=40 + bits)
    w_q, w_s = _weights(n, k, g, bits, seed=41)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV, torch.bfloat16)
    want = ref.convrot_linear(x, w_q, w_s, bias, g, bits)
    checked = b.w4a4_linear if bits == 4 else b.w8a8_linear
    _assert_linear_close(checked(x, w_q, w_s, bias, g), want)
    _assert_linear_close(b.linear_fn(g, bits)(x.contiguous(), w_q, w_s, bias), want)
    codes, scale = b.rotate_quantize(x, g) if bits == 4 else b.rotate_quantize_q8(x, g)
    want_codes, want_scale = ref.rotate_quantize(x, g, bits)
    assert codes.shape == want_codes.shape
    _assert_codes_close(codes, want_codes, bits)
    torch.testing.assert_close(scale, want_scale, rtol=1e-5, atol=0)
    assert b.supports_shape(k, n, g) and not b.supports_shape(k + 8, n, g)


def test_linear_op_is_opaque_to_tracing():
    """linear_op(): the custom op gives the linear's result and has a shape-only fake for torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = tk.linear_op()
    x = _acts(17, 256, torch.bfloat16, seed=3)
    w_q, w_s = _weights(24, 256, 64, 4, seed=4)
    _assert_linear_close(op(x, w_q, w_s, None, 64, 4), ref.convrot_linear(x, w_q, w_s, None, 64, 4))
    with FakeTensorMode() as mode:
        fx, fw, fs = mode.from_tensor(x), mode.from_tensor(w_q), mode.from_tensor(w_s)
        y = op(fx, fw, fs, None, 64, 4)
    assert y.shape == (17, 24) and y.dtype == torch.bfloat16


def _split_perm(k):
    """perm[p] = the channel whose code the split order stores at position p (built from the definition: per 128
    channels, the 64 even ones, then the 64 odd ones), independent of the kernels' index arithmetic."""
    perm = []
    for c in range(0, k, 128):
        perm += [c + 2 * i for i in range(64)] + [c + 2 * i + 1 for i in range(64)]
    return torch.tensor(perm, device=DEV)


def test_split_perm_is_the_documented_order():
    perm = _split_perm(384)
    assert torch.equal(perm.sort().values, torch.arange(384, device=DEV))
    spots = {0: 0, 1: 2, 63: 126, 64: 1, 65: 3, 127: 127, 128: 128, 129: 130, 192: 129, 383: 383}
    assert {p: perm[p].item() for p in spots} == spots


@pytest.mark.parametrize("group_size,k", [(16, 384), (64, 256), (256, 512)] + ([(256, 3072)] if CUDA else []))
@pytest.mark.parametrize("m", [1, 77])
@pytest.mark.parametrize("rq", tk.RQ_KERNELS)
def test_rotate_quantize_split_order(group_size, k, m, rq):
    """split=True writes the channel-order codes permuted into the split chunk order: undoing the permutation
    gives exactly the kernel's channel-order codes, and those match the reference."""
    x = _acts(m, k, torch.bfloat16, seed=k + m)
    q = _poisoned_codes((m, k))
    s = torch.full((m,), float("nan"), device=DEV)
    tk.rotate_quantize(x, group_size, 4, packed=False, split=True, out=q, scale_out=s, rq=rq)
    assert (q != -128).all(), "unwritten code bytes"
    qc, sc = tk.rotate_quantize(x, group_size, 4, packed=False, rq=rq)
    assert torch.equal(s, sc)
    unperm = torch.empty_like(q)
    unperm[:, _split_perm(k)] = q
    assert torch.equal(unperm, qc)
    assert not torch.equal(q, qc)  # (the permutation is no identity on these codes)
    qr, sr = ref.rotate_quantize(x, group_size, 4)
    torch.testing.assert_close(s, sr, rtol=2e-6, atol=0)
    _assert_codes_close(ref.pack_int4(unperm), qr, 4)


# block configs besides the fixed one (ONE_DOT on): two dots per chunk; two chunks per K step, in both forms
_SPLIT_CFGS = {"two_dots": dict(ONE_DOT=False), "bk256": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, GROUP_M=2),
               "bk256_two_dots": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, GROUP_M=2, ONE_DOT=False)}
# (M, N, K, block config); BLOCK_K=256 only where K % 256 == 0 (as the autotuner prunes)
_SPLIT_GEMM_CASES = [(1, 40, 256, "fixed"), (3, 200, 384, "fixed"), (77, 40, 384, "two_dots"),
                     (1, 200, 384, "two_dots"), (77, 200, 256, "bk256"), (3, 40, 256, "bk256_two_dots")]


@pytest.mark.parametrize("swap", [False, True], ids=["split", "split_swap"])
@pytest.mark.parametrize("m,n,k,cfg", _SPLIT_GEMM_CASES)
def test_gemm_split_exact_accumulator_and_epilogue(m, n, k, cfg, swap, monkeypatch):
    """gemm(split=True[, swap=True]): split-order int8 activation codes x packed int4 weight (K % 128 == 0) equals
    the reference GEMM of the channel-order codes: exactly (int32 accumulator) and bit-equal after the epilogue."""
    if cfg != "fixed":
        monkeypatch.setattr(tk, "_SPLIT_FIXED", {**tk._SPLIT_FIXED, **_SPLIT_CFGS[cfg]})
    m, n = (m * 61, n * 16) if CUDA else (m, n)
    ac, wc = _codes(m, k, 7, 31 + m), _codes(n, k, 8, 32 + n).clamp_(-8, 7)  # -8: the full int4 range
    a = ac[:, _split_perm(k)].contiguous()
    w = ref.pack_int4(wc)
    ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
    out = torch.full((m, n), float("nan"), device=DEV)
    acc = tk.gemm(a, ones_m, w, ones_n, None, torch.float32, k=k, out=out, split=True, swap=swap)
    assert acc is out
    assert torch.equal(acc, ref.int_matmul(ac, wc, 8).to(torch.float32))
    if m == 3:  # the same codes in channel order are no valid split-order input: the test tells the orders apart
        assert not torch.equal(tk.gemm(ac, ones_m, w, ones_n, None, torch.float32, k=k, split=True, swap=swap), acc)
    g = torch.Generator().manual_seed(k + n)
    a_s = (torch.rand(m, generator=g) + 0.01).to(DEV) * 1e-2
    w_s = (torch.rand(n, generator=g) + 0.01).to(DEV) * 1e-2
    b32 = torch.randn(n, generator=g).to(DEV)
    # fp32 out: the epilogue's own roundings, (acc * a_scale) * w_scale + bias, in that order, show bit for bit
    for dt, bias in ((torch.float32, b32), (torch.bfloat16, b32.bfloat16()), (torch.float16, None)):
        y = torch.full((m, n), float("nan"), device=DEV, dtype=dt)
        tk.gemm(a, a_s, w, w_s, bias, dt, k=k, out=y, split=True, swap=swap)
        want = ref.quantized_gemm(ref.pack_int4(ac), a_s, w, w_s, bias, dt, 4)
        assert torch.isfinite(y).all()
        assert torch.equal(y, want)


@pytest.mark.parametrize("n,k", [(37, 208), (200, 384), (3, 16)])
def test_unpack_weight_matches_reference(n, k):
    """The Triton unpack (W4_GEMM = "unpack") gives reference.unpack_int4's codes, also from a strided or
    misaligned view."""
    wc = _codes(n, k, 8, n + k).clamp_(-8, 7)
    w = ref.pack_int4(wc)
    out = _poisoned_codes((n, k))
    assert tk.unpack_weight(w, out=out) is out
    assert torch.equal(out, wc)
    wide = ref.pack_int4(_codes(n, k + 16, 8, 3).clamp_(-8, 7))
    for off in (8, 1):  # word-aligned offset, then a misaligned one (copied first)
        view = wide[:, off:off + k // 2]
        assert torch.equal(tk.unpack_weight(view), ref.unpack_int4(view))


def test_w4_route_choice():
    assert tk.W4_GEMM in tk.W4_GEMMS
    assert tk.W4_GEMMS == ("split", "split_swap", "unpack", "packed", "packed_x16")
    assert tk._w4_route("split", 384, True) == "split"
    assert tk._w4_route("split_swap", 256, True) == "split_swap"
    assert tk._w4_route("split", 208, True) == "packed_x16"  # K % 128 != 0: the fallback
    assert tk._w4_route("split_swap", 320, True) == "packed_x16"
    assert tk._w4_route("unpack", 208, True) == "unpack"
    assert tk._w4_route("packed_x16", 208, True) == "packed_x16"
    assert tk._w4_route("split", 384, False) == "int8"  # prepared int8 weights
    with pytest.raises(ValueError, match="CONVROT_TRITON_W4"):
        tk._w4_route("splitt", 384, True)
    with pytest.raises(ValueError, match="CONVROT_TRITON_W4"):
        tk.linear_fn(64, 4, w4_gemm="nope")


def test_split_autotune_configs_pruned_per_k_and_variant():
    j = tk._jit()
    for swap in (False, True):
        for k in (128, 384, 3072):
            cfgs = j._prune_split(j.SPLIT_CONFIGS, {"K": k}, SWAP=swap)
            assert cfgs and all(k % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_K"] % 128 == 0 for c in cfgs)
            if swap:  # BLOCK_N is then the wgmma M side: 64 rows per warpgroup
                assert all(c.kwargs["BLOCK_N"] >= 64 for c in cfgs)
            assert {c.kwargs["ONE_DOT"] for c in cfgs} == {True, False}


def _count_calls(monkeypatch, name):
    calls = []
    fn = getattr(tk, name)

    def spy(*args, **kwargs):
        calls.append((*args, kwargs))
        return fn(*args, **kwargs)

    monkeypatch.setattr(tk, name, spy)
    return calls


# G, K, dtype: K % 128 == 0 runs the split kernels; K = 208 (G=16) takes the packed_x16 fallback
_ROUTE_CASES = [(16, 384, torch.bfloat16), (16, 208, torch.float16), (64, 256, torch.float16),
                (256, 512, torch.bfloat16)] + ([(256, 3072, torch.bfloat16), (64, 3072, torch.float16)] if CUDA else [])


@pytest.mark.parametrize("group_size,k,dtype", _ROUTE_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("route", ["split", "split_swap", "unpack", "packed_x16"])
def test_linear_w4_routes_match_reference(route, group_size, k, dtype, monkeypatch):
    """linear(w4_gemm=route): the reference's result and bit-equal to the packed route (same codes, exact
    integer sums, same epilogue); the split kernels run exactly where K % 128 == 0."""
    m, n = (333, 3072 + 8) if CUDA else (33, 40)
    x = _acts(m, k, dtype, seed=k + group_size)
    w_q, w_s = _weights(n, k, group_size, 4, seed=k)
    split_calls = _count_calls(monkeypatch, "_launch_gemm_split")
    unpack_calls = _count_calls(monkeypatch, "_launch_unpack")
    gemm_calls = _count_calls(monkeypatch, "_launch_gemm")
    for bias in (torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV, dtype), None):
        out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
        y = tk.linear(x, w_q, w_s, bias, group_size, 4, out=out, w4_gemm=route)
        assert y is out
        _assert_linear_close(y, ref.convrot_linear(x, w_q, w_s, bias, group_size, 4))
        if bias is not None:
            assert torch.equal(y, tk.linear(x, w_q, w_s, bias, group_size, 4, w4_gemm="packed"))
    assert len(split_calls) == (2 if route.startswith("split") and k % 128 == 0 else 0)
    assert len(unpack_calls) == (2 if route == "unpack" else 0)
    # the routed calls come first (then the packed comparison): packed_x16 really unpacks by 16x
    x16 = route == "packed_x16" or (route.startswith("split") and k % 128 != 0)  # the split routes' fallback
    assert gemm_calls[0][-1].get("w_x16", False) == x16
    if route.startswith("split"):
        assert all(c[7] == (route == "split_swap") for c in split_calls)  # the swap argument


@pytest.mark.parametrize("route", ["split", "split_swap", "unpack", "packed_x16"])
@pytest.mark.parametrize("m", [1, 17])
def test_linear_fn_w4_routes(route, m, monkeypatch):
    """linear_fn(G, 4, w4_gemm=route) and the custom op under W4_GEMM = route: packed weights take the route,
    prepared int8 weights the int8 GEMM; all match the reference."""
    k, n, g = (3072, 9216, 256) if CUDA else (256, 40, 64)
    x = _acts(m, k, torch.bfloat16, seed=m + 50)
    w_q, w_s = _weights(n, k, g, 4, seed=51)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV, torch.bfloat16)
    want = ref.convrot_linear(x, w_q, w_s, bias, g, 4)
    split_calls = _count_calls(monkeypatch, "_launch_gemm_split")
    f = tk.linear_fn(g, 4, w4_gemm=route)
    _assert_linear_close(f(x, w_q, w_s, bias), want)
    _assert_linear_close(f(x, w_q, w_s, None), ref.convrot_linear(x, w_q, w_s, None, g, 4))
    _assert_linear_close(f(x, tk.prepare_weight(w_q), w_s, bias), want)
    assert len(split_calls) == (2 if route.startswith("split") else 0)
    monkeypatch.setattr(tk, "W4_GEMM", route)
    _assert_linear_close(tk.linear_op()(x, w_q, w_s, bias, g, 4), want)
    assert len(split_calls) == (3 if route.startswith("split") else 0)


@pytest.mark.parametrize("rq", ["fwht", "row"])
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_with_each_rotate_quantize_method(rq, bits):
    """linear_fn(rq=method) (split_swap for W4): the reference's result; K not a power of two (the row method
    pads the row in registers)."""
    k, n, g = (3072, 3072 + 8, 256) if CUDA else (384, 40, 64)
    x = _acts(65, k, torch.bfloat16, seed=bits + 60)
    w_q, w_s = _weights(n, k, g, bits, seed=61)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEV, torch.bfloat16)
    f = tk.linear_fn(g, bits, w4_gemm="split_swap", rq=rq)
    _assert_linear_close(f(x, w_q, w_s, bias), ref.convrot_linear(x, w_q, w_s, bias, g, bits))


class _LaunchSpy:
    """Stands in for a jit kernel (kernel[grid](...)): records which kernel launched, and launches it."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append("fwht" if kwargs.get("FWHT") else self.name)
            return launch(*args, **kwargs)
        return run


def test_each_method_launches_its_kernel(kernels, monkeypatch):
    """rq=method runs that method's kernel (results alone would not tell: every method computes the same codes);
    "auto" runs row where a row needs no padding; row falls back to fwht above ROW_MAX_K."""
    log = []
    for attr, name in (("rotate_quantize_kernel", "dot"), ("rotate_quantize_row_kernel", "row"),
                       ("rotate_quantize_tuned", "dot"), ("rotate_quantize_fwht_tuned", "fwht"),
                       ("rotate_quantize_row_tuned", "row")):
        monkeypatch.setattr(kernels, attr, _LaunchSpy(getattr(kernels, attr), name, log))
    x = _acts(3, 512, torch.bfloat16, seed=3)
    for method in tk.RQ_KERNELS:
        tk.rotate_quantize(x, 64, 4, rq=method)
        assert log.pop() == method and not log
    monkeypatch.setattr(tk, "ROW_MAX_K", 256)
    for rows, k, want in ((2, 256, "row"), (3, 256, "row"), (3, 512, "fwht")):
        tk.rotate_quantize(x[:rows, :k].contiguous(), 64, 4, rq="auto")
        assert log.pop() == want and not log
    tk.rotate_quantize(x, 64, 4, rq="row")
    assert log.pop() == "fwht"


@pytest.mark.skipif(not CUDA, reason="autotuning runs compiled kernels only (needs a CUDA GPU)")
@pytest.mark.parametrize("m,k", [(512, 3072), (4096, 12288), (1, 15360)])
@pytest.mark.parametrize("rq", ["fwht", "row"])
def test_autotuned_rotate_quantize_methods(rq, m, k, monkeypatch):
    """The fwht and row methods with their autotune configs (and prune functions) at FLUX shapes."""
    monkeypatch.setattr(tk, "AUTOTUNE", True)
    x = _acts(m, k, torch.bfloat16, seed=m + k)
    q, s = tk.rotate_quantize(x, 256, 4, rq=rq)
    qr, sr = ref.rotate_quantize(x, 256, 4)
    torch.testing.assert_close(s, sr, rtol=2e-6, atol=0)
    _assert_codes_close(q, qr, 4)


def test_autotune_prune_functions(kernels):
    """The row configs kept hold 8-64 values per thread, at most 32 with 16 warps (more spilled); some config is
    always left; fwht never steps past K."""
    for kp in (16, 128, 1024, 4096, 16384):
        kept = kernels._prune_row(kernels.ROW_CONFIGS, {}, KP=kp)
        assert kept
        per = [c.kwargs["BLOCK_M"] * kp // (32 * c.num_warps) for c in kept]
        if kp >= 1024:
            assert all(8 <= p <= (32 if c.num_warps == 16 else 64) for p, c in zip(per, kept)), (kp, per)
        else:  # nothing reaches 8 values per thread: the config nearest to it
            assert len(kept) == 1 and per[0] == max(c.kwargs["BLOCK_M"] * kp // (32 * c.num_warps)
                                                     for c in kernels.ROW_CONFIGS)
    assert (2, 16) not in {(c.kwargs["BLOCK_M"], c.num_warps) for c in kernels._prune_row(kernels.ROW_CONFIGS, {},
                                                                                           KP=16384)}
    kept = kernels._prune_row(kernels.ROW_CONFIGS, {}, KP=4096, THIRDS=True)  # K = 12288 as three tiles
    assert kept and all(8 <= c.kwargs["BLOCK_M"] * 12288 // (32 * c.num_warps) <= (32 if c.num_warps == 16 else 64)
                        for c in kept)
    assert all(c.kwargs["BLOCK_K"] <= 256 for c in kernels._prune_fwht(kernels.FWHT_CONFIGS, {"K": 256}))
    assert len(kernels._prune_fwht(kernels.FWHT_CONFIGS, {"K": 3072})) == len(kernels.FWHT_CONFIGS)


def test_row_tiles():
    assert tk.row_tiles(3072, 256) == (1024, True)  # FLUX's most common K: three tiles, no padding
    assert tk.row_tiles(12288, 256) == (4096, True)
    assert tk.row_tiles(15360, 256) == (16384, False)  # 15 x 1024: padded to a power of two
    assert tk.row_tiles(384, 256) == (512, False)  # a third would split a group
    assert tk.row_tiles(384, 64) == (128, True)
    assert tk.row_tiles(4096, 256) == (4096, False)


@pytest.mark.parametrize("group_size", [16, 64, 256])
@pytest.mark.parametrize("bits,packed,split",
                         [(4, True, False), (4, False, False), (4, False, True), (8, False, False)],
                         ids=["packed", "int8", "split", "w8"])
def test_row_method_in_thirds(group_size, bits, packed, split):
    """K = 3 * 2^n: the row kernel's three tiles give the reference's codes in every store format."""
    k = 3 * 256 if not CUDA else 3072
    assert tk.row_tiles(k, group_size)[1]
    x = _acts(7, k, torch.bfloat16, seed=group_size)
    q = _poisoned_codes((7, k // 2 if packed else k))
    q, s = tk.rotate_quantize(x, group_size, bits, packed=packed, split=split, out=q, rq="row")
    assert (q != -128).all(), "unwritten code bytes"
    qr, sr = ref.rotate_quantize(x, group_size, bits)
    torch.testing.assert_close(s, sr, rtol=2e-6, atol=0)
    if split:
        unperm = torch.empty_like(q)
        unperm[:, _split_perm(k)] = q
        q = unperm
    _assert_codes_close(q if packed or bits == 8 else ref.pack_int4(q), qr, bits)


def test_rotate_quantize_method_choice(monkeypatch):
    assert tk._rq_method("row", tk.ROW_MAX_K) == "row"
    assert tk._rq_method("row", tk.ROW_MAX_K + 256) == "fwht"  # a padded row would not fit in registers
    assert tk._rq_method("dot", 65536) == "dot"
    assert tk._rq_method("auto", 3072, 1) == "row"
    assert tk._rq_method("auto", 3072, 4608) == "row"
    assert tk._rq_method("auto", tk.ROW_MAX_K, 4096) == "row"
    assert tk._rq_method("auto", tk.ROW_MAX_K + 256, 4096) == "fwht"
    assert tk._rq_method("auto", 65536, 1) == "fwht"  # row, but too long for registers
    assert tk._rq_method("auto", 12288, 4096) == "row"  # three tiles of 4096
    assert tk._rq_method("auto", 15360, 4608) == "fwht"  # a row would pad it to 16384
    assert tk._rq_method("row", 15360) == "row"  # asked for: padded
    monkeypatch.setattr(tk, "RQ", "fwht")
    assert tk._rq_method(None, 3072) == "fwht"
    with pytest.raises(ValueError, match="CONVROT_TRITON_RQ"):
        tk._rq_method("rows", 3072)
    with pytest.raises(ValueError, match="CONVROT_TRITON_RQ"):
        tk.linear_fn(64, 4, rq="nope")


def test_prepare_weight_is_unpack():
    wc = _codes(16, 64, 7, 4)
    assert torch.equal(tk.prepare_weight(ref.pack_int4(wc)), wc)


def test_hadamard_factor_matches_hadamard_module():
    from convrot.hadamard import regular_hadamard

    for s in (16, 64):
        torch.testing.assert_close(tk._hadamard_pm1(s, "cpu"), regular_hadamard(s) * s**0.5, rtol=0, atol=1e-6)
    h16 = regular_hadamard(16).double()
    torch.testing.assert_close(torch.kron(h16, h16).float(), regular_hadamard(256), rtol=0, atol=1e-7)


def test_argument_errors():
    x = torch.zeros(2, 96, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group_size"):
        tk.rotate_quantize(x, 32, 4)
    with pytest.raises(ValueError, match="multiple"):
        tk.rotate_quantize(x, 64, 4)
    with pytest.raises(ValueError, match="bytes per row"):
        tk.gemm(torch.zeros(2, 10, dtype=torch.int8, device=DEV), torch.ones(2, device=DEV),
                torch.zeros(8, 32, dtype=torch.int8, device=DEV), torch.ones(8, device=DEV), None,
                torch.bfloat16, k=64)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        tk.linear(x.float(), torch.zeros(8, 48, dtype=torch.int8), torch.ones(8), None, 16, 4)
    x128 = torch.zeros(2, 128, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="split=True"):
        tk.rotate_quantize(x128, 16, 4, split=True)  # packed codes have no split order
    with pytest.raises(ValueError, match="split=True"):
        tk.rotate_quantize(x, 16, 4, packed=False, split=True)  # K = 96
    a8, ones = torch.zeros(2, 128, dtype=torch.int8, device=DEV), torch.ones(2, device=DEV)
    with pytest.raises(ValueError, match="swap=True"):
        tk.gemm(a8, ones, torch.zeros(2, 64, dtype=torch.int8, device=DEV), ones, None, torch.bfloat16, k=128,
                swap=True)
    with pytest.raises(ValueError, match="split=True"):
        tk.gemm(a8, ones, a8, ones, None, torch.bfloat16, k=128, split=True)  # int8 weight
    with pytest.raises(ValueError, match="x16=True"):
        tk.gemm(a8, ones, a8, ones, None, torch.bfloat16, k=128, x16=True)  # int8 weight


def test_limits_and_supports_shape():
    assert tk.LIMITS.group_sizes == (16, 64, 256) and tk.LIMITS.min_cuda_cc == (8, 0)
    assert tk.supports_shape(3072, 9216, 256, 4)
    assert tk.supports_shape(15360, 3072, 256, 8)
    assert not tk.supports_shape(3072 + 64, 3072, 256)
    assert not tk.supports_shape(3072, 3072, 32)
    assert not tk.supports_shape(3072, 3072, 256, bits=2)
    assert not tk.supports_shape(2 * tk.LIMITS.max_k, 8, 256)


def test_available_reasons():
    ok, why = tk.available("cpu")
    assert not ok and "GPU" in why
    if CUDA:
        ok, why = tk.available(torch.device("cuda"))
        cc = torch.cuda.get_device_capability()
        assert ok == (cc >= (8, 0) or bool(torch.version.hip)), why


def test_probe_checks_the_paths_real_layers_take(monkeypatch):
    """The availability probe runs the split GEMM (K = 128), G = 256's rotation and the K % 128 fallback against
    the reference (in the interpreter here, compiled on a GPU), and names a wrong result."""
    dev = torch.device(DEV)
    routes_run, methods_run = [], []
    real = tk._w4_route
    monkeypatch.setattr(tk, "_w4_route", lambda mode, k, packed: routes_run.append(real(mode, k, packed))
                        or routes_run[-1])
    real_rq = tk._rq_method
    monkeypatch.setattr(tk, "_rq_method", lambda rq, k, m=1: methods_run.append(real_rq(rq, k, m))
                        or methods_run[-1])
    if not CUDA:  # the interpreter: the row limit scaled down (the probe reads it; the same kernels)
        monkeypatch.setattr(tk, "ROW_MAX_K", 768)  # the three-tile row (K = 768) stays a row
    monkeypatch.setattr(tk, "RQ", "auto")
    tiles = []
    real_tiles = tk.row_tiles
    monkeypatch.setattr(tk, "row_tiles", lambda k, g: tiles.append(real_tiles(k, g)) or tiles[-1])
    assert tk._probe(dev) is None
    if tk.W4_GEMM.startswith("split"):
        assert {tk.W4_GEMM, "packed_x16", "int8"} <= set(routes_run), routes_run
    assert {"row", "fwht"} <= set(methods_run), methods_run
    assert {True, False} <= {thirds for _, thirds in tiles}, tiles  # the row kernel in both tile forms
    real_fn = tk.linear_fn
    monkeypatch.setattr(tk, "linear_fn", lambda g, bits, **kw: (lambda *a: real_fn(g, bits, **kw)(*a) * 1.5))
    why = tk._probe(dev)
    assert why is not None and "differs from the reference" in why and "G=16, K=128" in why


def test_pack_imports_and_reports_without_triton():
    """With triton unimportable the module still imports and available() names the missing package."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "from convrot import triton_kernels as tk\n"
            "ok, why = tk.available('cuda:0')\n"
            "assert not ok and 'triton is not installed' in why, why\n"
            "assert tk.supports_shape(3072, 3072, 256)\n"
            "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
