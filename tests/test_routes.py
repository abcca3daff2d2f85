"""Route decisions (convrot/routes.py): the CUDA extension, then Triton, then the weight-only dequant fallback on CUDA
devices (the reference elsewhere, or when forced); forced routes; what a machine without a GPU, Triton or a compiler
gets. CPU only: the kernels themselves are tested against the reference
in test_kernels_gpu.py and test_triton.py."""
from __future__ import annotations

import logging

import pytest
import torch

from convrot import dequant, ops, reference, routes, triton_kernels

OK_EXT = (True, "CUDA extension for sm_90")
OK_TRI = (True, "Triton 3.6.0 on sm_90 (NVIDIA H200)")
NO_EXT = (False, "no CUDA compiler (nvcc) was found")
NO_TRI = (False, "triton is not installed (pip install triton; on Windows: pip install triton-windows)")


@pytest.mark.parametrize("forced, ext, tri, want, says", [
    (None, OK_EXT, OK_TRI, "cuda", ["sm_90"]),
    (None, NO_EXT, OK_TRI, "triton", ["Triton 3.6.0", "no CUDA compiler"]),   # no compiler: Triton, and why
    (None, NO_EXT, NO_TRI, "dequant", ["no CUDA compiler", "triton is not installed"]),  # neither compiled route
    (None, OK_EXT, NO_TRI, "cuda", []),
    ("triton", OK_EXT, OK_TRI, "triton", ["CONVROT_ROUTE=triton"]),           # forced past a working extension
    ("triton", OK_EXT, NO_TRI, "dequant", ["CONVROT_ROUTE=triton", "triton is not installed"]),
    ("dequant", OK_EXT, OK_TRI, "dequant", ["CONVROT_ROUTE=dequant"]),         # forced past both compiled routes
    ("reference", OK_EXT, OK_TRI, "reference", ["CONVROT_ROUTE=reference"]),
    ("cuda", NO_EXT, OK_TRI, "triton", ["no CUDA compiler"]),                 # a forced route that can't run
    ("bogus", NO_EXT, OK_TRI, "triton", ["'bogus' is not one of"]),
    ("bogus", NO_EXT, NO_TRI, "dequant", ["'bogus' is not one of", "dequant", "no CUDA compiler"]),
])
def test_decide(forced, ext, tri, want, says):
    name, why = routes.decide("cuda", forced, ext, tri, triton_automatic=True)
    assert name == want
    for s in says:
        assert s in why, (s, why)


def test_triton_is_in_the_automatic_order_after_the_extension():
    """Measured in H200 servers: mixed on Triton 0.91x-1.23x of bf16 (S23-S35), on the dequant fallback 1.06x (S21)."""
    assert routes.TRITON_AUTOMATIC is True
    name, why = routes.decide("cuda", None, NO_EXT, OK_TRI)
    assert name == "triton" and "Triton 3.6.0" in why and "no CUDA compiler" in why
    assert routes.decide("cuda", None, OK_EXT, OK_TRI)[0] == "cuda"
    name, why = routes.decide("cuda", None, NO_EXT, OK_TRI, triton_automatic=False)  # the switch still works
    assert name == "dequant" and "CONVROT_ROUTE=triton runs it" in why


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


def test_dequant_is_for_cuda_devices_only():
    """Elsewhere the reference runs (exact math; on a CPU it costs about a dense GEMM), also when dequant is forced."""
    assert routes.decide("cpu", None, NO_EXT, NO_TRI)[0] == "reference"
    assert routes.decide("cpu", "dequant", NO_EXT, NO_TRI)[0] == "reference"


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU: there a CUDA device has "
                                                              "neither compiled route")


def _route_line(caplog, forced, monkeypatch):
    routes.reset()
    if forced is None:
        monkeypatch.delenv(routes.ENV, raising=False)
    else:
        monkeypatch.setenv(routes.ENV, forced)
    with caplog.at_level(logging.INFO, logger="convrot"):
        r = routes.route_for(torch.device("cuda", 0))
        routes.route_for(torch.device("cuda", 0))
    recs = [rec for rec in caplog.records if rec.getMessage().startswith("ConvRot on cuda:0")]
    routes.reset()
    assert len(recs) == 1  # once per device
    return r, recs[0]


@NO_GPU
def test_a_gpu_without_extension_or_triton_gets_dequant_and_says_so_once(caplog, monkeypatch):
    """On this CPU machine a CUDA device has neither compiled route (no GPU visible): the dequant fallback, one
    warning naming both reasons and what the fallback costs, not repeated on the next call."""
    r, rec = _route_line(caplog, None, monkeypatch)
    assert r.name == "dequant" and r.backend is dequant and rec.levelno == logging.WARNING
    line = rec.getMessage()
    assert "CUDA extension:" in line and "Triton:" in line and routes.COST["dequant"] in line


def test_the_dequant_cost_says_what_is_kept_and_what_is_lost():
    cost = routes.COST["dequant"]
    for s in ("weight-only", "slower than bf16", "memory saving", "no 4-bit speed-up", "CUDA toolkit"):
        assert s in cost, s
    assert "slower than bf16" in routes.COST["reference"]


@NO_GPU
@pytest.mark.parametrize("forced, want, backend", [("dequant", "dequant", dequant), ("reference", "reference", None),
                                                   ("Dequant ", "dequant", dequant)])
def test_forced_dequant_or_reference_on_a_cuda_device(forced, want, backend, caplog, monkeypatch):
    """CONVROT_ROUTE picks either torch-only route without trying the extension (a build can take minutes); asked
    for, it is said at info level."""
    def never(device):
        raise AssertionError("the extension was tried")
    monkeypatch.setattr(routes, "_cuda_extension", never)
    r, rec = _route_line(caplog, forced, monkeypatch)
    assert (r.name, r.backend) == (want, backend) and rec.levelno == logging.INFO
    assert f"{routes.ENV}={want}" in rec.getMessage() and routes.COST[want] in rec.getMessage()


@NO_GPU
def test_an_unknown_route_name_is_said_and_the_order_decides(caplog, monkeypatch):
    r, rec = _route_line(caplog, "fastest", monkeypatch)
    assert r.name == "dequant" and rec.levelno == logging.WARNING
    assert f"CONVROT_ROUTE='fastest' is not one of {', '.join(routes.ROUTES)}" in rec.getMessage()


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
    for backend in (kernels, routes._Triton, dequant):  # the extension module is its own backend, so is dequant
        for name in api:
            assert callable(getattr(backend, name, None)), (backend.__name__, name)
    assert set(routes.COST) == set(routes.ROUTES)


@NO_GPU
@pytest.mark.parametrize("ext_ok, forced, hip, probed, want", [
    (True, None, None, False, "cuda"),       # the extension runs: Triton's probe (kernel compiles) is not paid for
    (False, None, None, True, "triton"),     # no extension: Triton, automatically
    (False, "fastest", None, True, "triton"),  # an unknown CONVROT_ROUTE is ignored, the order decides
    (True, "triton", None, True, "triton"),  # asked for past a working extension
    (False, None, "6.2", False, "dequant"),  # ROCm: Triton's speed there is unmeasured, so only when asked
    (False, "triton", "6.2", True, "triton"),
])
def test_triton_is_probed_only_where_it_could_run(ext_ok, forced, hip, probed, want, caplog, monkeypatch):
    calls = []
    ext = (object(), (True, "CUDA extension for sm_90")) if ext_ok else (None, NO_EXT)
    monkeypatch.setattr(routes, "_cuda_extension", lambda device: ext)
    monkeypatch.setattr(routes, "_triton", lambda device: calls.append(device) or (object(), OK_TRI))
    monkeypatch.setattr(torch.version, "hip", hip)
    r, rec = _route_line(caplog, forced, monkeypatch)
    assert r.name == want and bool(calls) == probed
    if want == "dequant":  # the line says why Triton was skipped
        assert "CONVROT_ROUTE=triton runs it" in rec.getMessage()
