"""Which implementation computes ConvRot's ops on a device, decided once per device and said in one log line.

Order on a CUDA device: the built CUDA extension (convrot/kernels: CUTLASS on sm_90, int4 mma.sync on sm_80/86/89),
then PyTorch's own int8 GEMMs (convrot/torchmm: the W4A4/W8A8 math in torch ops, no compiler and no Triton; sm_75+
and ROCm), then the Triton kernels (convrot/triton_kernels: no compiler at install time, sm_80 and newer), then the
weight-only fallback (convrot/dequant.py: codes expanded per call, cuBLAS; any CUDA GPU), which leaves the PyTorch
reference (convrot/reference.py: exact ConvRot math, everywhere, CPU tensors always) to `CONVROT_ROUTE=reference`.
`CONVROT_ROUTE=cuda|torchmm|triton|dequant|reference` forces one (a forced route that cannot run on the device falls
to the next one, and the log line says so); `CONVROT_DISABLE_KERNELS=1` keeps the extension unbuilt, as before.

A backend offers the fast-op API that convrot/ops.py calls: supports_shape(k, n, group_size),
rotate_quantize(x2d, g) (4-bit, packed), rotate_quantize_q8(x2d, g), linear_fn(g, bits) (the unchecked per-layer
call) and w4a4_linear / w8a8_linear(x2d, w, w_scale, bias, g) (checked, traceable by torch.compile).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import dequant, torchmm

log = logging.getLogger("convrot")

ROUTES = ("cuda", "torchmm", "triton", "dequant", "reference")
ENV = "CONVROT_ROUTE"
# Triton is in the automatic order after the CUDA extension: in H200 servers (bench/NOTES.md Sessions 11-12) mixed
# on it ran at 0.91x-1.23x of bf16 (the dequant fallback: 1.06x, S21); its GPU tests passed on that machine (the whole
# file in S21, the rotate+quantize, method, probe, launch and split tests with today's kernels in S33).
TRITON_AUTOMATIC = True
_TRITON_OPT_IN = f"not in the automatic order yet ({ENV}=triton runs it)"
# torchmm computes the reference's integer math through torch._int_mm (tests/test_torchmm.py); it joins the automatic
# order once bench/torchmm_bench.py and an end-to-end run have shown it beating dequant on a GPU.
TORCHMM_AUTOMATIC = False
_TORCHMM_OPT_IN = f"not in the automatic order yet ({ENV}=torchmm runs it)"
# what the log line calls each compiled route that was skipped
_LABEL = {"cuda": "CUDA extension", "torchmm": "torchmm", "triton": "Triton"}

# What each route costs, for the log line (measured figures live in README / bench/NOTES.md)
COST = {
    "cuda": "ConvRot's fastest kernels",
    "torchmm": "W4A4/W8A8 through PyTorch's own int8 GEMM (torch._int_mm: cuBLAS/hipBLASLt int8 tensor cores), "
               "rotate+quantize and the epilogue in torch ops: ConvRot's integer math, no compiler or Triton "
               "needed; speed not measured yet",
    "triton": "portable Triton kernels, no CUDA compiler needed (mixed ran at 0.91x-1.23x of bf16 in H200 servers, "
              "where the CUDA extension ran at 1.60x; the first step also tunes the kernels, once per process)",
    "dequant": "weight-only fallback, each layer's codes expanded to bf16/fp16 per call for cuBLAS: slower than "
               "bf16 eagerly (mixed: 0.67x of bf16 in an H200 server), about bf16's speed compiled (1.06x there), "
               "the memory saving kept, no 4-bit speed-up (on NVIDIA GPUs from sm_80 a working Triton, or a CUDA "
               "toolkit that builds ConvRot's extension, gives the 4-bit kernels)",
    "reference": "the PyTorch reference path, ConvRot's exact math: far slower than bf16 on a GPU (mixed ran at 0.09x "
                 "of bf16 on an H200, in process)",
}


@dataclass(frozen=True)
class Route:
    name: str                  # one of ROUTES
    why: str                   # what runs here, and why the faster routes do not
    backend: object | None     # None for the reference


class _Triton:
    """triton_kernels behind the backend API (the extension module, convrot.kernels, offers it as it is)."""

    def __init__(self, module):
        self.m = module

    def supports_shape(self, k, n, group_size):
        return self.m.supports_shape(k, n, group_size)

    def rotate_quantize(self, x2d, g):
        return self.m.rotate_quantize(x2d, g, 4)

    def rotate_quantize_q8(self, x2d, g):
        return self.m.rotate_quantize(x2d, g, 8)

    def linear_fn(self, g, bits):
        return self.m.linear_fn(g, bits)

    def w4a4_linear(self, x2d, w, w_scale, bias, g):
        return self.m.linear_op()(x2d, w, w_scale, bias, g, 4)

    def w8a8_linear(self, x2d, w, w_scale, bias, g):
        return self.m.linear_op()(x2d, w, w_scale, bias, g, 8)


def decide(device: str, forced: str | None, cuda: tuple[bool, str], triton: tuple[bool, str],
           triton_automatic: bool | None = None, torchmm: tuple[bool, str] | None = None,
           torchmm_automatic: bool | None = None) -> tuple[str, str]:
    """(route, why) from what each route reported for a device: (ok, reason) pairs. Pure, for tests."""
    auto = TRITON_AUTOMATIC if triton_automatic is None else triton_automatic
    auto_mm = TORCHMM_AUTOMATIC if torchmm_automatic is None else torchmm_automatic
    torchmm = (False, "not tried") if torchmm is None else torchmm
    note = ""
    if forced is not None and forced not in ROUTES:
        note, forced = f"{ENV}={forced!r} is not one of {', '.join(ROUTES)}; ", None
    if triton[0] and forced != "triton" and not auto:
        triton = (False, _TRITON_OPT_IN)
    if torchmm[0] and forced != "torchmm" and not auto_mm:
        torchmm = (False, _TORCHMM_OPT_IN)
    return _decide(device, forced, cuda, triton, torchmm, note)


def _decide(device, forced, cuda, triton, torchmm, note=""):
    tried = {"cuda": cuda, "torchmm": torchmm, "triton": triton}
    order = list(ROUTES[ROUTES.index(forced):]) if forced else list(ROUTES)
    skipped = []
    if forced and forced != "cuda":
        note += f"{ENV}={forced}; "
    for name in order:
        if name == "dequant" and device != "cuda":
            continue  # it stands in for GPU kernels; on a CPU the reference costs about a dense GEMM, and is exact
        if name in ("dequant", "reference"):  # torch ops only: they run wherever torch does, so they never fail
            return name, note + ("; ".join(skipped) if skipped else f"{device} tensors")
        ok, reason = tried[name]
        if ok:
            why = f"{note}{reason}" + (f" ({'; '.join(skipped)})" if skipped else "")
            return name, why
        skipped.append(f"{_LABEL[name]}: {reason}")


_routes: dict[str, Route] = {}


def decided() -> dict[str, str]:
    """device -> route name, for the devices decided so far in this process (nothing is decided by asking)."""
    return {k: r.name for k, r in _routes.items()}


def route_for(device: torch.device) -> Route:
    """The route for a device (cached; the first decision per device is logged once)."""
    key = _key(device)
    r = _routes.get(key)
    if r is None:
        r = _routes[key] = _route(device)
        asked = os.environ.get(ENV, "").strip().lower() == r.name
        # a GPU without ConvRot's kernels loses the speed-up the user installed this for: worth a warning, unless asked
        level = logging.WARNING if r.name in ("dequant", "reference") and device.type == "cuda" and not asked \
            else logging.INFO
        if device.type == "cuda" or r.name != "reference":
            log.log(level, "ConvRot on %s: %s: %s [%s]", key, r.name, COST[r.name], r.why)
    return r


def _key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _route(device: torch.device) -> Route:
    forced = os.environ.get(ENV, "").strip().lower() or None
    if device.type != "cuda":
        return Route("reference", f"{device.type} tensors", None)
    # each check can cost: the extension builds on first use, Triton compiles a probe; only where it could be picked
    ext, ext_report = _cuda_extension(device) if forced in (None, "cuda") or forced not in ROUTES else \
        (None, (False, f"not tried ({ENV}={forced})"))
    auto = forced in (None, "cuda") or forced not in ROUTES  # an unknown CONVROT_ROUTE is ignored (decide says so)
    wanted = forced == "torchmm" or (TORCHMM_AUTOMATIC and auto)
    mm, mm_report = _torchmm(device) if wanted else (None, (False, _TORCHMM_OPT_IN))
    # Triton's probe compiles kernels (seconds): only where it could be picked
    tri_auto = TRITON_AUTOMATIC and torch.version.hip is None  # ROCm: correct in the probe, speed never measured
    wanted = forced in ("triton", "torchmm") or (tri_auto and auto and not ext_report[0])
    if wanted:
        tri, tri_report = _triton(device)
    else:
        tri, tri_report = None, (False, "not tried (the CUDA extension runs)" if ext_report[0] and tri_auto
                                 else _TRITON_OPT_IN)
    name, why = decide(device.type, forced, ext_report, tri_report, torchmm=mm_report)
    backend = {"cuda": ext, "torchmm": mm, "triton": tri, "dequant": dequant}.get(name)
    return Route(name, why, backend)


def _cuda_extension(device) -> tuple[object | None, tuple[bool, str]]:
    try:
        from . import kernels
    except Exception as e:  # the extension is optional: a broken install must never break inference
        return None, (False, f"cannot import convrot.kernels ({type(e).__name__}: {e})")
    try:
        if kernels.available(device):
            return kernels, (True, f"CUDA extension for sm_{''.join(map(str, kernels._state['cc']))}")
        return None, (False, kernels.unavailable_reason() or f"not built for this GPU "
                      f"(sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})")
    except Exception as e:  # noqa: BLE001
        return None, (False, f"{type(e).__name__}: {e}")


def _torchmm(device) -> tuple[object | None, tuple[bool, str]]:
    ok, reason = torchmm.available(device)  # never raises
    return (torchmm if ok else None), (ok, reason)


def _triton(device) -> tuple[object | None, tuple[bool, str]]:
    try:
        from . import triton_kernels
        ok, reason = triton_kernels.available(device)
    except Exception as e:  # noqa: BLE001 - never raise into dispatch
        return None, (False, f"{type(e).__name__}: {e}")
    return (_Triton(triton_kernels) if ok else None), (ok, reason)


def reset() -> None:
    """Forget the decisions (tests, or after CONVROT_ROUTE changed), and the per-shape calls ops kept from them."""
    _routes.clear()
    from . import ops
    ops._routes.clear()
