"""LoRA branches folded into the W4A4 GEMM (convrot.lowrank): the reference arithmetic on CPU, the kernel on a GPU."""
from __future__ import annotations

import pytest
import torch

from convrot import lowrank, reference


def _layer(n, k, r, seed, dtype=torch.float32, lora_scale=0.3):
    """A W4A4 layer with outlier input channels and a LoRA moving its output by roughly `lora_scale`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w_q, w_s = reference.rotate_quantize(w, 256)
    x = torch.randn(3, 37, k, generator=g)
    x[..., torch.randint(0, k, (k // 256,), generator=g)] *= 30
    down = torch.randn(r, k, generator=g) / k ** 0.5
    up = torch.randn(n, r, generator=g) / r ** 0.5
    bias = torch.randn(n, generator=g) * 0.1
    y_main = x @ w.t()
    lora = (x @ down.t()) @ up.t()
    up = up * (lora_scale * y_main.norm() / lora.norm())  # strength folded into `up`, as nodes/lora.py does
    return x.to(dtype), w, w_q, w_s, down, up, bias.to(dtype)


def _exact_branch(x, w_q, w_s, bias, down, up):
    y = reference.convrot_linear(x, w_q, w_s, bias, 256).float()
    return y + (x.float() @ down.t()) @ up.t()


@pytest.mark.parametrize("r", [8, 32, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_folded_branch_matches_exact_branch(r, seed):
    n, k = 264, 1024
    x, w, w_q, w_s, down, up, bias = _layer(n, k, r, seed)
    codes = lowrank.prepare(down, up, w_s, torch.float32)
    assert codes.q.shape == (n, lowrank.padded_rank(r)) and codes.down.shape[0] % 64 == 0
    y = lowrank.reference_linear(x, w_q, bias, 256, codes)
    exact = _exact_branch(x, w_q, w_s, bias, down, up)
    lora = (x @ down.t()) @ up.t()
    # the folding error is a small fraction of the LoRA's own contribution ...
    rel_to_lora = float((y.float() - exact).norm() / lora.norm())
    assert rel_to_lora < 0.05, rel_to_lora  # measured 1.4-3.1% (r = 8-40)
    # ... and far below the W4A4 error of the layer itself
    full = x @ w.t() + bias + lora
    w4a4_err = float((exact - full).norm())
    assert float((y.float() - exact).norm()) < 0.15 * w4a4_err
    assert int(codes.clamped) == 0


def test_without_lora_the_extension_is_the_plain_w4a4_product():
    """Zero LoRA: the x4 / x16 code multipliers and the /64 epilogue give the plain W4A4 result."""
    n, k = 128, 512
    x, w, w_q, w_s, down, up, bias = _layer(n, k, 16, 3)
    codes = lowrank.prepare(down, torch.zeros_like(up), w_s, torch.float32)
    y = lowrank.reference_linear(x, w_q, bias, 256, codes)
    plain = reference.convrot_linear(x, w_q, w_s, bias, 256)
    torch.testing.assert_close(y, plain, rtol=1e-6, atol=1e-6)


def test_a_lora_too_strong_for_the_codes_is_counted():
    n, k = 128, 512
    x, w, w_q, w_s, down, up, bias = _layer(n, k, 16, 4, lora_scale=500.0)
    codes = lowrank.prepare(down, up, w_s, torch.float32)
    lowrank.reference_linear(x, w_q, bias, 256, codes)
    assert int(codes.clamped) > 0


def test_rank_above_the_limit_is_not_folded():
    n, k = 64, 256
    _, _, _, w_s, _, _, _ = _layer(n, k, 8, 5)
    assert lowrank.prepare(torch.zeros(300, k), torch.zeros(n, 300), w_s, torch.float32) is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r", [(1, 3072, 3072, 32), (77, 3072, 520, 40), (600, 12288, 264, 64),
                                     (513, 1024, 1032, 128)])
def test_kernel_matches_reference(dtype, m, k, n, r):
    from convrot import kernels
    if not (kernels.available(torch.device("cuda")) and kernels.can_fold_lowrank()):
        pytest.skip(f"folding needs the sm_90 build ({kernels.unavailable_reason() or 'other GPU'})")
    g = torch.Generator(device="cuda").manual_seed(m + k + r)
    x = torch.randn(m, k, device="cuda", generator=g)
    x[:, torch.randint(0, k, (k // 256,), device="cuda", generator=g)] *= 50
    x = x.to(dtype)
    w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
    w_q, w_s = kernels.rotate_quantize(w, 256)
    down = torch.randn(r, k, device="cuda", generator=g) / k ** 0.5
    up = torch.randn(n, r, device="cuda", generator=g) * 0.05
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    codes = lowrank.prepare(down, up, w_s, dtype)
    rp = codes.q.shape[1]
    # the op's pieces, bit for bit where the arithmetic is exact
    torch.empty(m * (k + rp) * 4, dtype=torch.uint8, device="cuda").fill_(0x55)  # poison what the op allocates next
    h = x @ codes.down.t()
    a, a_s, w8 = torch.ops.convrot.rotate_quantize_i8_unpack_lora(x, 256, w_q, h, codes.pmul, codes.q, codes.clamped)
    assert a.shape == (m, k + rp) and w8.shape == (n, k + rp)
    assert torch.equal(w8[:, :k], reference.unpack_int4(w_q) * lowrank.W_MUL)
    assert torch.equal(w8[:, k:], codes.q)
    a_ref, a_s_ref = reference.rotate_quantize(x, 256)
    torch.testing.assert_close(a_s, a_s_ref, rtol=1e-5, atol=0)
    diff = (a[:, :k].to(torch.int16) - (reference.unpack_int4(a_ref) * lowrank.A_MUL).to(torch.int16)).abs()
    assert int(diff.max()) <= lowrank.A_MUL and int((diff != 0).sum()) <= max(2, diff.numel() // 1000)
    p_ref, n_clamped = lowrank.act_tail(h, a_s, codes.pmul)
    assert n_clamped == 0 and int(codes.clamped) == 0
    assert int((a[:, k:].to(torch.int16) - p_ref.to(torch.int16)).abs().max()) <= 1  # reciprocal vs division
    # the whole linear against the reference and against the exact separate branch
    y = lowrank.linear(x, w_q, bias, 256, codes)
    y_ref = lowrank.reference_linear(x, w_q, bias, 256, codes)
    exact = reference.convrot_linear(x, w_q, w_s, bias, 256).float() + (x.float() @ down.t()) @ up.t()
    lora_norm = float(((x.float() @ down.t()) @ up.t()).norm())
    assert float((y.float() - y_ref.float()).norm()) < 0.02 * float(y_ref.float().norm())
    assert float((y.float() - exact).norm()) < 0.05 * lora_norm + 0.01 * float(exact.norm())
