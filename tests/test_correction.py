"""convrot.correction: the calibration-free scale search and low-rank branch (CPU, seeded weights, fast)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convrot import reference
from convrot.correction import (CorrectedLinear, corrected_convrot_linear, quantize_rows_searched,
                                quantize_with_correction, search_scales)
from convrot.quality import dit_like_activations, rel_err

G = 256


def trained_like_weight(n=384, k=512, seed=0):
    """A weight with a decaying spectrum and a few loud input channels (trained weights have both; iid ones neither)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    s = 1.0 / (1 + torch.arange(min(n, k), dtype=torch.float32)) ** 0.7
    w = (u[:, : len(s)] * s) @ v[:, : len(s)].t()
    w[:, torch.randperm(k, generator=gen)[:4]] *= 6
    return (w / w.std() / k**0.5).to(torch.bfloat16)


def test_scale_search_reduces_to_absmax_and_never_increases_mse():
    r = torch.randn(64, G, generator=torch.Generator().manual_seed(1))
    c1, s1 = quantize_rows_searched(r, 4, alphas=(1.0,))
    c0, s0 = reference.quantize_rows(r, 4)
    assert torch.equal(c1, c0) and torch.equal(s1, s0)
    c, s = quantize_rows_searched(r, 4)
    mse = lambda c, s: (c.float() * s[:, None] - r).pow(2).sum(1)  # noqa: E731
    assert (mse(c, s) <= mse(c0, s0) + 1e-12).all()
    assert mse(c, s).sum() < 0.9 * mse(c0, s0).sum()
    assert c.abs().max() <= 7


def test_rank0_without_search_is_the_engine_quantization():
    w = trained_like_weight()
    cw = quantize_with_correction(w, G, 4, rank=0, scale_search=False)
    q, s = reference.rotate_quantize(w, G, 4)
    assert torch.equal(cw.codes, q) and torch.equal(cw.scale, s) and cw.rank == 0 and cw.branch_values() == 0
    q2, s2 = search_scales(w, G)
    assert q2.shape == q.shape and q2.dtype == torch.int8


@pytest.mark.parametrize("mode", ["error", "weight"])
def test_branch_shapes_cost_and_weight_error(mode):
    w = trained_like_weight()
    n, k = w.shape
    plain = reference.dequantize_weight(*reference.rotate_quantize(w, G, 4), G)
    cw = quantize_with_correction(w, G, 4, rank=16, mode=mode)
    assert cw.down.shape == (16, k) and cw.up.shape == (n, 16) and cw.down.dtype == torch.bfloat16
    assert cw.branch_values() == 16 * (n + k)
    assert (cw.dequantize() - w.float()).norm() < 0.8 * (plain - w.float()).norm()


def test_weight_mode_cuts_the_layer_output_error_activation_rounding_included():
    """W4A4 output error (weights *and* per-token activations at 4 bits) on DiT-like inputs: the SVD-of-the-weight
    branch shrinks both; the SVD-of-the-error branch only the weight's share."""
    w = trained_like_weight()
    x = dit_like_activations(256, w.shape[1], seed=3)
    ref = F.linear(x.float(), w.float())
    plain = rel_err(reference.convrot_linear(x.float(), *reference.rotate_quantize(w, G, 4), None, G, 4), ref)
    errs = {}
    for mode in ("error", "weight"):
        layer, _ = corrected_convrot_linear(w, None, G, 4, rank=32, mode=mode)
        errs[mode] = rel_err(layer(x.float()), ref)
    assert errs["weight"] < 0.8 * plain
    assert errs["weight"] < errs["error"] < plain


def test_corrected_linear_is_base_plus_branch():
    w = trained_like_weight(256, 512)
    b = (0.01 * torch.randn(256, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16)
    layer, cw = corrected_convrot_linear(w, b, G, 4, rank=8)
    assert isinstance(layer, CorrectedLinear)
    x = torch.randn(3, 5, 512, generator=torch.Generator().manual_seed(4))
    want = reference.convrot_linear(x, cw.codes, cw.scale, b, G, 4) + (x @ cw.down.float().t()) @ cw.up.float().t()
    torch.testing.assert_close(layer(x), want)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError):
        quantize_with_correction(trained_like_weight(), G, 4, rank=4, mode="nope")
