"""qlinear under torch.compile's fake-tensor propagation: a QuantizedTensor's F.linear is run by Dynamo as one node
on FakeTensors, outside tracing (torch.compiler.is_compiling() is False there). A raw per-layer launcher must not see
them: on the GPU server the Triton route's launcher read a FakeTensor's data pointer and the compiled step failed
(bench/NOTES.md, Session 7)."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from convrot import ops, reference


def test_fake_tensors_never_reach_a_raw_launcher(monkeypatch):
    calls = []

    def raw(x2d, w_q, w_scale, bias):  # what a Triton/CUDA launcher does first
        calls.append(x2d.shape)
        x2d.data_ptr()
        raise AssertionError("a raw launcher ran")

    monkeypatch.setattr(ops, "fast_linear_fn", lambda *a: raw)
    monkeypatch.setattr(ops, "_routes", {})
    gen = torch.Generator().manual_seed(3)
    k, n, g = 512, 72, 64
    w_q, w_s = reference.rotate_quantize(torch.randn(n, k, generator=gen), g, 4)
    x = torch.randn(2, 5, k, generator=gen).to(torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        y = ops.qlinear(fx, mode.from_tensor(w_q), mode.from_tensor(w_s), None, g, 4)
        assert tuple(y.shape) == (2, 5, n) and y.dtype == torch.bfloat16
    assert calls == []
    try:  # a real tensor still takes the raw launcher: the check above can fail
        ops.qlinear(x, w_q, w_s, None, g, 4)
    except AssertionError:
        pass
    assert len(calls) == 1
