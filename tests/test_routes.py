"""Route decisions (convrot/routes.py): the CUDA extension, then Triton, then the reference; forced routes; what a
machine without a GPU, Triton or a compiler gets. CPU only: the kernels themselves are tested against the reference
in test_kernels_gpu.py and test_triton.py."""
from __future__ import annotations

import logging

import pytest
import torch

from convrot import ops, reference, routes, triton_kernels

OK_EXT = (True, "CUDA extension for sm_90")
OK_TRI = (True, "Triton 3.6.0 on sm_90 (NVIDIA H200)")
NO_EXT = (False, "no CUDA compiler (nvcc) was found")
NO_TRI = (False, "triton is not installed (pip install triton; on Windows: pip install triton-windows)")


@pytest.mark.parametrize("forced, ext, tri, want, says", [
    (None, OK_EXT, OK_TRI, "cuda", ["sm_90"]),
    (None, NO_EXT, OK_TRI, "triton", ["Triton 3.6.0", "no CUDA compiler"]),   # no compiler: Triton, and why
    (None, NO_EXT, NO_TRI, "reference", ["no CUDA compiler", "triton is not installed"]),
    (None, OK_EXT, NO_TRI, "cuda", []),
    ("triton", OK_EXT, OK_TRI, "triton", ["CONVROT_ROUTE=triton"]),           # forced past a working extension
    ("triton", OK_EXT, NO_TRI, "reference", ["CONVROT_ROUTE=triton", "triton is not installed"]),
    ("reference", OK_EXT, OK_TRI, "reference", ["CONVROT_ROUTE=reference"]),
    ("cuda", NO_EXT, OK_TRI, "triton", ["no CUDA compiler"]),                 # a forced route that can't run
    ("bogus", NO_EXT, OK_TRI, "triton", ["'bogus' is not one of"]),
])
def test_decide(forced, ext, tri, want, says):
    name, why = routes.decide("cuda", forced, ext, tri, triton_automatic=True)
    assert name == want
    for s in says:
        assert s in why, (s, why)


def test_triton_stays_out_of_the_automatic_order_until_verified_on_a_gpu():
    assert routes.TRITON_AUTOMATIC is False  # flip it with the GPU run of test_triton.py (README, issue 18)
    name, why = routes.decide("cuda", None, NO_EXT, OK_TRI)
    assert name == "reference" and "CONVROT_ROUTE=triton runs it" in why and "no CUDA compiler" in why
    assert routes.decide("cuda", "triton", NO_EXT, OK_TRI)[0] == "triton"
    assert routes.decide("cuda", None, OK_EXT, OK_TRI)[0] == "cuda"


def test_cpu_tensors_take_the_reference_route_silently(caplog):
    routes.reset()
    with caplog.at_level(logging.INFO, logger="convrot"):
        r = routes.route_for(torch.device("cpu"))
    assert (r.name, r.backend) == ("reference", None)
    assert not [m for m in caplog.messages if "ConvRot on cpu" in m]  # the CPU is not a degraded GPU
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 256, generator=g)
    x = torch.randn(5, 256, generator=g)
    x[:, 11] *= 50  # an outlier channel
    wq, ws = ops.quantize_weight(w, 256)
    assert torch.equal(ops.linear(x, wq, ws, None, 256), reference.convrot_linear(x, wq, ws, None, 256))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU: there a CUDA device has no route")
def test_a_gpu_without_extension_or_triton_says_so_once(caplog, monkeypatch):
    """On this CPU machine a CUDA device has neither route (no GPU visible): the reference, one warning naming both
    reasons, not repeated on the next call."""
    routes.reset()
    monkeypatch.delenv(routes.ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="convrot"):
        r = routes.route_for(torch.device("cuda", 0))
        routes.route_for(torch.device("cuda", 0))
    lines = [m for m in caplog.messages if m.startswith("ConvRot on cuda:0")]
    assert r.name == "reference" and r.backend is None and len(lines) == 1
    assert "CUDA extension:" in lines[0] and "Triton:" in lines[0] and "slower than bf16" in lines[0]
    routes.reset()


def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(triton_kernels, "triton_version", lambda: None)
    backend, (ok, reason) = routes._triton(torch.device("cuda", 0))
    assert backend is None and not ok and "triton is not installed" in reason


def test_the_extension_disabled_by_the_user_is_named(monkeypatch):
    from convrot import kernels
    monkeypatch.setenv("CONVROT_DISABLE_KERNELS", "1")
    monkeypatch.setitem(kernels._state, "tried", False)
    monkeypatch.setitem(kernels._state, "ops", None)
    monkeypatch.setitem(kernels._state, "reason", None)
    backend, (ok, reason) = routes._cuda_extension(torch.device("cuda", 0))
    assert backend is None and not ok and "CONVROT_DISABLE_KERNELS" in reason


def test_backends_offer_the_api_ops_calls():
    api = ("supports_shape", "rotate_quantize", "rotate_quantize_q8", "linear_fn", "w4a4_linear", "w8a8_linear")
    from convrot import kernels
    for backend in (kernels, routes._Triton):  # the extension module is its own backend
        for name in api:
            assert callable(getattr(backend, name, None)), (backend.__name__, name)
    assert set(routes.COST) == set(routes.ROUTES)
