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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, 64, 256])
def test_rotate_quantize_matches_reference(group_size, bits, dtype):
    m, k = (333, 3 * 1024) if CUDA else (17, K_OF[group_size])
    x = _acts(m, k, dtype, seed=group_size + bits)
    cols = k // 2 if bits == 4 else k
    q = _poisoned_codes((m, cols))
    s = torch.full((m,), float("nan"), device=DEV)
    q2, s2 = tk.rotate_quantize(x, group_size, bits, out=q, scale_out=s)
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


@pytest.mark.parametrize("group_size", [16, 64, 256])
def test_rotate_quantize_fp32_weights(group_size):
    """fp32 input (offline weight quantization): the kernel's three-piece bf16 split keeps fp32 accuracy."""
    w = _acts(24, K_OF[group_size], torch.float32, seed=7)
    q, s = tk.rotate_quantize(w, group_size, 4)
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
    bias = torch.randn(n, device=DEV).to(dtype)
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
    bias = torch.randn(n, device=DEV).to(torch.bfloat16)
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
    bias = torch.randn(n, device=DEV).to(torch.bfloat16)
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
    bias = torch.randn(n, device=DEV).to(torch.bfloat16)
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
