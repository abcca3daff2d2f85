import pytest
import torch

from convrot import ConvRotLinear
from convrot.reference import (
    convrot_linear, dequantize_weight, int_matmul, pack_int4, quantize_rows, quantized_gemm, rotate,
    rotate_quantize, unpack_int4)


def outlier_input(m, k, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 50  # channel outliers
    x[: max(1, m // 8)] += 20  # token rows with a large common offset
    return x.to(dtype)


def test_pack_roundtrip_and_nibble_order():
    codes = torch.randint(-8, 8, (5, 34), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (5, 17)
    assert torch.equal(unpack_int4(packed), codes)
    one = pack_int4(torch.tensor([[3, -2]], dtype=torch.int8))  # low nibble = even k
    assert one.view(torch.uint8).item() == (3 | (0xE << 4))


def test_quantize_rows_is_symmetric_int4_round_half_even():
    x = torch.tensor([[7.0, 2.5, -3.5, 0.5, -7.0, 1.5]])
    codes, scale = quantize_rows(x, 4)
    assert scale.item() == 1.0
    assert codes.tolist() == [[7, 2, -4, 0, -7, 2]]  # 2.5 -> 2, -3.5 -> -4, 0.5 -> 0, 1.5 -> 2
    assert codes.abs().max() <= 7


def test_zero_rows_stay_finite():
    codes, scale = quantize_rows(torch.zeros(2, 8), 4)
    assert torch.all(codes == 0) and torch.all(torch.isfinite(scale)) and torch.all(scale > 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_error_is_bounded_by_half_a_step(bits):
    x = outlier_input(17, 512, dtype=torch.float32)
    codes, scale = quantize_rows(x, bits)
    err = (codes.float() * scale[:, None] - x).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)


def test_int_matmul_is_exact():
    a = torch.randint(-7, 8, (9, 15360), dtype=torch.int8)
    b = torch.randint(-7, 8, (5, 15360), dtype=torch.int8)
    exact = a.long() @ b.long().T
    assert torch.equal(int_matmul(a, b).long(), exact)
    a8 = torch.randint(-127, 128, (3, 3072), dtype=torch.int8)
    b8 = torch.randint(-127, 128, (4, 3072), dtype=torch.int8)
    assert torch.equal(int_matmul(a8, b8).long(), a8.long() @ b8.long().T)


@pytest.mark.parametrize("g", [16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_matches_dequantized_math(g, dtype):
    k, n = 512, 96
    x = outlier_input(13, k, dtype=dtype)
    w = torch.randn(n, k) / k**0.5
    b = torch.randn(n)
    wq, ws = rotate_quantize(w, g)
    out = convrot_linear(x, wq, ws, b.to(dtype), g)
    assert out.dtype == dtype and out.shape == (13, n)
    # the same computation spelled out in float64 from the codes
    aq, as_ = rotate_quantize(x, g)
    ref = (unpack_int4(aq).double() * as_.double()[:, None]) @ (unpack_int4(wq).double() * ws.double()[:, None]).T
    ref = ref + b.double()
    assert torch.allclose(out.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_w4a4_is_close_to_float_and_rotation_helps_outliers():
    k, n = 1024, 256
    x = outlier_input(64, k, dtype=torch.float32)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k**0.5  # seeded: independent of test order
    ref = x @ w.T
    wq, ws = rotate_quantize(w, 256)
    rel = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    rotated = rel(convrot_linear(x, wq, ws, None, 256))
    # without rotation: plain per-token / per-channel int4
    xc, xs = quantize_rows(x, 4)
    wc, wsc = quantize_rows(w, 4)
    plain = rel(quantized_gemm(pack_int4(xc), xs, pack_int4(wc), wsc, None, torch.float32))
    assert rotated < 0.25
    assert rotated < 0.7 * plain


def test_leading_batch_dims_and_empty_batch():
    w = torch.randn(32, 256)
    m = ConvRotLinear.from_float(w, torch.zeros(32), 64)
    x = torch.randn(2, 3, 5, 256, dtype=torch.bfloat16)
    y = m(x)
    assert y.shape == (2, 3, 5, 32) and y.dtype == torch.bfloat16
    assert torch.allclose(y[1, 2], m(x[1, 2]))
    assert m(torch.randn(0, 256, dtype=torch.bfloat16)).shape == (0, 32)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_weight_recovers_weight(bits):
    w = torch.randn(64, 512)
    m = ConvRotLinear.from_float(w, None, 64, bits)
    err = (m.dequantize() - w).norm() / w.norm()
    assert err < (0.15 if bits == 4 else 0.01)


def test_module_state_dict_is_the_checkpoint_layout():
    m = ConvRotLinear.from_float(torch.randn(48, 256), torch.randn(48), 256)
    sd = m.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (48, 128)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (48,)
    m2 = ConvRotLinear.from_quantized(sd["weight"], sd["weight_scale"], sd["bias"], 256)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(m(x), m2(x))


def test_module_refuses_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        ConvRotLinear(100, 8, group_size=64)
    with pytest.raises(ValueError, match="group size"):
        ConvRotLinear(256, 8, group_size=32)


def test_int_matmul_long_int8_rows_stay_exact_without_float64():
    # K = 5000 int8 codes: partial sums exceed 2^24, so K is split into exact fp32 chunks summed in int32
    a = torch.full((2, 5000), 127, dtype=torch.int8)
    b = torch.full((3, 5000), -127, dtype=torch.int8)
    b[0, ::7] = 1
    b[1, 1] = 3  # a value no float32 holds exactly at this magnitude: the accumulator must be an integer type
    got = int_matmul(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), a.long() @ b.long().T)


@pytest.mark.parametrize("m", [1, 16, 17, 40])
def test_int8_mm_matches_the_reference_gemm(m):
    """The cuBLAS-int8 route of W8A8 (torch._int_mm also runs on the CPU), tiny batches padded."""
    from convrot.ops import int8_mm
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-127, 128, (m, 512), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 512), generator=g, dtype=torch.int8)
    sa, sw, b = torch.rand(m, generator=g), torch.rand(24, generator=g), torch.randn(24, generator=g)
    got = int8_mm(a, sa, w, sw, b, torch.float32)
    want = quantized_gemm(a, sa, w, sw, b, torch.float32, bits=8)
    assert got.shape == (m, 24)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
