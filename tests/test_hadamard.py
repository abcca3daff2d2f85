import pytest
import torch

from convrot.hadamard import H4, SUPPORTED_GROUP_SIZES, check_group_size, fast_regular_hadamard, regular_hadamard
from convrot.reference import rotate


@pytest.mark.parametrize("g", SUPPORTED_GROUP_SIZES)
def test_regular_hadamard_is_orthogonal_symmetric_with_equal_row_sums(g):
    h = regular_hadamard(g).double()
    assert torch.allclose(h @ h.T, torch.eye(g, dtype=torch.float64), atol=1e-6)
    assert torch.equal(h, h.T)
    sums = h.sum(dim=1)
    assert torch.allclose(sums, sums[0].expand_as(sums), atol=1e-6)
    assert abs(float(sums[0]) - 1.0) < 1e-6  # H4 rows sum to 2, so (H4 ⊗ ... ⊗ H4)/sqrt(g) rows sum to 1
    assert set((h * g**0.5).round().unique().tolist()) == {-1.0, 1.0}


def test_built_from_the_4x4_regular_hadamard():
    h4 = torch.tensor(H4, dtype=torch.float32)
    assert torch.allclose(regular_hadamard(16), torch.kron(h4, h4) / 4)


@pytest.mark.parametrize("g", SUPPORTED_GROUP_SIZES)
def test_fast_transform_equals_matrix(g):
    x = torch.randn(33, g, dtype=torch.float64).float() * 10
    x[:, 3] += 200  # an outlier channel
    ref = x.double() @ regular_hadamard(g).double()
    assert torch.allclose(fast_regular_hadamard(x, g).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("g", SUPPORTED_GROUP_SIZES)
def test_rotating_activations_and_weights_leaves_the_product_unchanged(g):
    k = 3 * g
    x = torch.randn(5, 7, k, dtype=torch.float64)
    w = torch.randn(48, k, dtype=torch.float64)
    ref = x @ w.T
    got = rotate(x.float(), g).double() @ rotate(w.float(), g).double().T
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-3)


def test_rotation_spreads_a_row_offset_unlike_sylvester():
    # a token whose channels share a large common offset: the Sylvester matrix's all-ones first row collects the
    # whole offset into one channel; the regular matrix spreads it evenly (the row-wise outliers of the paper)
    g = 64
    x = torch.full((1, g), 10.0) + 0.1 * torch.randn(1, g)
    s = torch.tensor([[1.0]])
    for _ in range(3):
        s = torch.kron(s, torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    syl = torch.kron(s, s) / g**0.5
    assert (x @ syl).abs().max() > 5 * rotate(x, g).abs().max()


@pytest.mark.parametrize("bad", [0, 4, 8, 32, 128, 512])
def test_unsupported_group_size_is_refused(bad):
    with pytest.raises(ValueError, match="group size"):
        check_group_size(bad)


def test_k_not_multiple_of_group_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        rotate(torch.randn(2, 100), 64)


def test_a_matrix_made_while_tracing_is_never_kept():
    """Seen on an H200 server (dequant route, Compile Blocks): AOTAutograd ran the QuantizedTensor dispatch on fake
    tensors with is_compiling() False, a matrix made there was kept, and the next block's compile failed with
    "Mixing fake modes". Each trace must get a matrix of its own mode, eager code a real one."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    dtype = torch.float16  # a dtype no other test asks for, so nothing is kept before the traces below
    for _ in range(2):
        with FakeTensorMode() as mode:
            h = regular_hadamard(64, "cpu", dtype)
            assert isinstance(h, FakeTensor) and h.fake_mode is mode
    traced = make_fx(lambda x: x @ regular_hadamard(64, x.device, dtype))(torch.ones(2, 64, dtype=dtype))
    real = regular_hadamard(64, "cpu", dtype)
    assert type(real) is torch.Tensor
    assert torch.equal(real, regular_hadamard(64).to(dtype))
    assert torch.equal(traced(torch.eye(64, dtype=dtype)[:2]), real[:2])
    assert regular_hadamard(64, "cpu", dtype) is real  # eager calls share one
