"""CUDA graph replay of whole model calls (convrot.graphs): signatures on the CPU, capture and replay on a GPU."""
from __future__ import annotations

import logging
import uuid

import pytest
import torch
import torch.nn.functional as F

from convrot import graphs, lowrank
from convrot.linear import ConvRotLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# a replay runs the captured kernels on the same inputs; only library heuristics (cuBLAS workspace while
# capturing) may differ in the last bit. A stale or missing input copy is off by O(1).
EXACT = {"rtol": 2e-3, "atol": 2e-3}


# ---------------------------------------------------------------- signatures (CPU)

def test_signature_keys_on_structure_shapes_and_plain_values():
    x = torch.zeros(2, 3)
    opts = {"sigmas": torch.tensor([0.5]), "uuids": [uuid.UUID(int=1)], "block": 3, "fn": print}
    s1, t1 = graphs.signature((x,), {"transformer_options": opts})
    s2, _ = graphs.signature((torch.zeros(2, 3),), {"transformer_options": dict(opts)})
    assert s1 == s2 and t1 == []  # CPU tensors are not graph inputs; values of small ones are in the signature
    changed = [
        ((torch.zeros(2, 4),), {"transformer_options": opts}),
        ((torch.ones(2, 3),), {"transformer_options": opts}),
        ((x,), {"transformer_options": {**opts, "sigmas": torch.tensor([0.25])}}),
        ((x,), {"transformer_options": {**opts, "block": 4}}),
        ((x,), {"transformer_options": {**opts, "fn": len}}),
        ((x,), {"transformer_options": {**opts, "uuids": [uuid.UUID(int=2)]}}),
        ((x, None), {"transformer_options": opts}),
    ]
    for args, kwargs in changed:
        assert graphs.signature(args, kwargs)[0] != s1, (args, kwargs)
    with pytest.raises(graphs.Uncapturable, match=r"kwargs\['big'\] is a \(300,\) tensor on cpu"):
        graphs.signature((), {"big": torch.zeros(300)})


def test_uuid_values_are_compared_by_value():
    a = graphs.signature((), {"u": uuid.UUID(int=7)})[0]
    assert a == graphs.signature((), {"u": uuid.UUID(int=7)})[0]


def test_cpu_calls_run_eagerly_with_one_reason(caplog):
    calls = []

    def fn(x, scale=1.0):
        calls.append(1)
        return x * scale

    run = graphs.GraphedCalls("test")
    with caplog.at_level(logging.WARNING, logger="convrot"):
        for i in range(3):
            x = torch.randn(4)
            assert torch.equal(run(fn, x, scale=2.0), x * 2.0)
    assert len(calls) == 3 and run.eager == 3 and run.captures == 0
    assert run.disabled == "the call has no CUDA tensor"
    assert sum("running eagerly" in r.message for r in caplog.records) == 1


# ---------------------------------------------------------------- capture and replay (GPU)

class Toy(torch.nn.Module):
    """A small transformer-ish block: W4A4 linears (fast kernels where built), a LoRA folded into one of them
    where the sm_90 build has that op, LayerNorm, attention, GELU, a residual; an optional nested output."""

    def __init__(self, k=512, n=768, seed=0):
        super().__init__()
        g = torch.Generator(device="cuda").manual_seed(seed)
        w1 = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
        w2 = torch.randn(k, n, device="cuda", generator=g) / n ** 0.5
        self.l1 = ConvRotLinear.from_float(w1, torch.randn(n, device="cuda", generator=g).bfloat16() * 0.1)
        self.l2 = ConvRotLinear.from_float(w2, None)
        self.norm = torch.nn.LayerNorm(k, device="cuda", dtype=torch.bfloat16)
        self.codes = None
        if lowrank.kernels_can_fold(torch.device("cuda"), torch.bfloat16):
            down = torch.randn(16, k, device="cuda", generator=g) / k ** 0.5
            up = torch.randn(n, 16, device="cuda", generator=g) * 0.05
            self.codes = lowrank.prepare(down, up, self.l1.weight_scale, torch.bfloat16)

    def forward(self, x, cond, opts):
        h = self.norm(x) * (1 + cond["scale"][:, None, :])
        if self.codes is not None:
            m, k = h.shape[0] * h.shape[1], h.shape[2]
            h = lowrank.linear(h.reshape(m, k).contiguous(), self.l1.weight, self.l1.bias, 256, self.codes)
            h = h.view(*x.shape[:2], -1)
        else:
            h = self.l1(h)
        q = h[..., :256].unflatten(-1, (4, 64)).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)
        h = F.gelu(torch.cat([a, h[..., 256:]], -1))
        y = x + self.l2(h) * opts["gate"]
        return {"y": y, "mean": [y.float().mean(1)]}


def _inputs(seed, b=2, t=40, k=512):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, t, k, device="cuda", generator=g).bfloat16()
    x[..., torch.randint(0, k, (4,), device="cuda", generator=g)] *= 40  # outlier channels
    cond = {"scale": 0.1 * torch.randn(b, k, device="cuda", generator=g).bfloat16()}
    opts = {"gate": torch.rand(1, device="cuda", generator=g).bfloat16(), "step": 0, "uuids": [uuid.UUID(int=5)]}
    return x, cond, opts


@cuda
@torch.inference_mode()
def test_replays_match_eager_calls_on_fresh_inputs():
    model = Toy()
    run = graphs.GraphedCalls("test")
    kept = []
    for i in range(6):
        x, cond, opts = _inputs(100 + i)
        ref = model(x, cond, opts)
        if run.graphs:  # poison the captured output: a replay must overwrite all of it
            for g in run.graphs.values():
                g.output["y"].fill_(float("nan"))
                g.output["mean"][0].fill_(float("nan"))
        out = run(model, x, cond, opts)
        torch.testing.assert_close(out["y"], ref["y"], **EXACT)
        torch.testing.assert_close(out["mean"][0], ref["mean"][0], **EXACT)
        kept.append((out, ref))
    for out, ref in kept:  # a later replay must not have overwritten an earlier result
        torch.testing.assert_close(out["y"], ref["y"], **EXACT)
    assert (run.captures, run.replays, run.eager, run.disabled) == (1, 5, 1, None)
    x, cond, opts = _inputs(7, t=24)  # a new shape: a second graph, the first one kept
    torch.testing.assert_close(run(model, x, cond, opts)["y"], model(x, cond, opts)["y"], **EXACT)
    x, cond, opts = _inputs(8, t=24)
    opts["step"] = 1  # a plain value the model could branch on: a new graph too
    torch.testing.assert_close(run(model, x, cond, opts)["y"], model(x, cond, opts)["y"], **EXACT)
    assert run.captures == 3 and len(run.graphs) == 3
    x, cond, opts = _inputs(9)
    torch.testing.assert_close(run(model, x, cond, opts)["y"], model(x, cond, opts)["y"], **EXACT)
    assert run.replays == 6
    run.close()
    assert not run.graphs


@cuda
@torch.inference_mode()
def test_too_many_signatures_fall_back_to_eager(caplog):
    model = Toy()
    run = graphs.GraphedCalls("test", max_graphs=2)
    with caplog.at_level(logging.WARNING, logger="convrot"):
        for i, t in enumerate((8, 16, 24, 32, 8)):
            x, cond, opts = _inputs(i, t=t)
            torch.testing.assert_close(run(model, x, cond, opts)["y"], model(x, cond, opts)["y"], **EXACT)
    assert run.disabled == "more than 2 different calls (the last two differ at args[0])"
    assert run.captures == 2 and not run.graphs and run.eager == 5


def _check(run, fn, seed, **kw):
    """run(fn) on fresh inputs against the plain toy model (a _Calls' reference call is not one of its calls)."""
    x, cond, opts = _inputs(seed, **kw)
    ref = getattr(fn, "model", fn)
    torch.testing.assert_close(run(fn, x, cond, opts)["y"], ref(x, cond, opts)["y"], **EXACT)


class _Calls:
    """The toy model, doing something else on chosen calls of it (1 = the first call)."""

    def __init__(self, model, on, action):
        self.model, self.on, self.action, self.n = model, set(on), action, 0

    def __call__(self, x, cond, opts):
        self.n += 1
        y = self.model(x, cond, opts)
        if self.n in self.on:
            self.action(y)
        return y


def _sync(y):
    float(y["y"].float().abs().max())  # a host synchronisation: not allowed while capturing


@cuda
@torch.inference_mode()
def test_a_model_that_synchronizes_every_call_is_never_captured(caplog):
    model = Toy()
    stream = torch.cuda.current_stream()
    fn = _Calls(model, range(1, 100), _sync)
    run = graphs.GraphedCalls("test")
    with caplog.at_level(logging.WARNING, logger="convrot"):
        for i in range(3):
            _check(run, fn, 20 + i)
    assert run.disabled.startswith("the model synchronizes with the host on every call"), run.disabled
    assert fn.n == 4 and run.eager == 3 and run.captures == 0  # two warm-ups, then eager
    assert torch.cuda.current_stream() == stream and graphs.GraphedCalls.broken is None
    assert sum("running eagerly" in r.message for r in caplog.records) == 1


@cuda
@torch.inference_mode()
def test_a_one_time_synchronization_gets_a_second_warm_up():
    model = Toy()
    fn = _Calls(model, {1}, _sync)  # like a first-call check or a compilation
    run = graphs.GraphedCalls("test")
    for i in range(3):
        _check(run, fn, 60 + i)
    assert (run.captures, run.replays, run.disabled, fn.n) == (1, 2, None, 3)  # warm-up, warm-up, capture


def _query(y):
    torch.cuda.current_stream().query()  # illegal while capturing, and not a synchronisation PyTorch checks for


@cuda
@torch.inference_mode()
def test_a_host_sync_while_capturing_fails_cleanly(monkeypatch):
    """Sync debugging is set to "error" while capturing: PyTorch raises before the synchronisation, so the capture
    is never invalidated inside CUDA (under cudaMallocAsync that invalidation aborted the process): this run goes
    eager, and the next run captures again."""
    monkeypatch.setattr(graphs.GraphedCalls, "broken", None)
    model = Toy()
    stream = torch.cuda.current_stream()
    fn = _Calls(model, {2}, _sync)  # clean warm-up, synchronizes while capturing
    run = graphs.GraphedCalls("test")
    _check(run, fn, 90)
    assert run.disabled.startswith("capture failed") and "synchroniz" in run.disabled, run.disabled
    assert torch.cuda.current_stream() == stream and graphs.GraphedCalls.broken is None
    assert torch.cuda.get_sync_debug_mode() == 0  # restored
    run2 = graphs.GraphedCalls("test")
    for i in range(3):
        _check(run2, model, 91 + i)
    assert (run2.captures, run2.replays, run2.disabled) == (1, 2, None), (run2.captures, run2.replays, run2.disabled)


@cuda
@torch.inference_mode()
def test_a_capture_that_fails_inside_cuda_is_undone(monkeypatch):
    monkeypatch.setattr(graphs.GraphedCalls, "broken", None)
    model = Toy()
    stream = torch.cuda.current_stream()
    fn = _Calls(model, {2}, _query)  # clean warm-up, an illegal stream query while capturing
    run = graphs.GraphedCalls("test")
    _check(run, fn, 70)
    assert run.disabled.startswith("capture failed"), run.disabled
    assert torch.cuda.current_stream() == stream  # the failed capture_end skipped restoring it
    assert graphs.GraphedCalls.broken and "until ComfyUI restarts" in graphs.GraphedCalls.broken
    reserved = []
    for i in range(4):  # eager calls allocate from the normal pools again: nothing accumulates
        _check(run, model, 71 + i)
        torch.cuda.empty_cache()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[-1] <= reserved[0] + (8 << 20), reserved
    run2 = graphs.GraphedCalls("test")
    _check(run2, model, 80)
    assert "earlier capture failed" in run2.disabled and run2.captures == 0


@cuda
@torch.inference_mode()
def test_an_interrupt_while_capturing_propagates_and_leaves_cuda_clean():
    class Interrupted(Exception):
        pass

    def interrupt(y):
        raise Interrupted()

    model = Toy()
    stream = torch.cuda.current_stream()
    run = graphs.GraphedCalls("test", reraise=(Interrupted,))
    x, cond, opts = _inputs(90)
    with pytest.raises(Interrupted):
        run(_Calls(model, {2}, interrupt), x, cond, opts)
    assert torch.cuda.current_stream() == stream and graphs.GraphedCalls.broken is None
    run2 = graphs.GraphedCalls("test")
    for i in range(2):
        _check(run2, model, 91 + i)
    assert run2.replays == 1


class _Patch:
    def __init__(self):
        self.bias = torch.zeros(3, device="cuda")


@cuda
@pytest.mark.parametrize("value, reason", [
    (lambda: torch.zeros(1000), "args[2]['extra'] is a (1000,) tensor on cpu"),  # values a graph would bake in
    (_Patch, "args[2]['extra'] (_Patch) holds GPU tensors (bias)"),  # tensors the signature cannot see or copy
], ids=["large cpu tensor", "object holding gpu tensors"])
@torch.inference_mode()
def test_arguments_a_graph_cannot_track_are_refused(value, reason):
    model = Toy()
    run = graphs.GraphedCalls("test")
    x, cond, opts = _inputs(95)
    opts["extra"] = value()
    torch.testing.assert_close(run(model, x, cond, opts)["y"], model(x, cond, opts)["y"], **EXACT)
    assert run.disabled == reason + " (not capturable)", run.disabled
    assert run.captures == 0


@cuda
@torch.inference_mode()
def test_weights_updated_in_place_are_seen_replaced_ones_never_replayed():
    model = Toy()
    run = graphs.GraphedCalls("test", guard=lambda: tuple(p.data_ptr() for p in model.norm.parameters()))
    for i in range(2):
        x, cond, opts = _inputs(50 + i)
        torch.testing.assert_close(run(model, x, cond, opts)["y"], model(x, cond, opts)["y"], **EXACT)
    model.norm.weight.mul_(1.5)  # in place (ComfyUI's copy_to_param): the graph reads the new values
    x, cond, opts = _inputs(52)
    torch.testing.assert_close(run(model, x, cond, opts)["y"], model(x, cond, opts)["y"], **EXACT)
    assert run.replays == 2 and run.disabled is None
    model.norm.weight = torch.nn.Parameter(model.norm.weight * 2)  # replaced (ComfyUI's set_attr_param)
    x, cond, opts = _inputs(53)
    torch.testing.assert_close(run(model, x, cond, opts)["y"], model(x, cond, opts)["y"], **EXACT)
    assert run.replays == 2 and "replaced since the capture" in run.disabled
    assert run.captures == 1 and not run.graphs  # nothing captured after the refusal
    # replaced between the capture of one signature and the next
    run = graphs.GraphedCalls("test", guard=lambda: tuple(p.data_ptr() for p in model.norm.parameters()))
    _check(run, model, 54)
    model.norm.weight = torch.nn.Parameter(model.norm.weight * 0.5)
    _check(run, model, 55, t=24)
    assert run.captures == 1 and "replaced since the last capture" in run.disabled


_ASYNC_PROBE = r"""
import sys, torch
sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
assert torch.cuda.get_allocator_backend() == "cudaMallocAsync", torch.cuda.get_allocator_backend()
import test_graphs as t
from convrot import graphs
scenario = {scenario!r}
if scenario == "no-first-launch":  # the code before the fix: no launch between the capture and the next step
    graphs.GraphedCalls._first_launch = staticmethod(lambda graph: None)
if scenario == "failed-capture-freed":  # the code before the fix: a failed capture's tensors freed
    graphs.GraphedCalls._keep_failed = staticmethod(lambda held, error, what: None)
cache = {{}}
class Caching(torch.nn.Module):
    # keeps a buffer made inside the call, as ComfyUI's caches and compiled code's state do
    def __init__(self):
        super().__init__(); self.model = t.Toy()
    def forward(self, x, cond, opts):
        y = self.model(x, cond, opts)
        cache["last"] = y["y"] * 2
        return y
with torch.inference_mode():
    m = Caching()
    if scenario.startswith("failed-capture"):  # a host sync while capturing: eager from then on, the process lives
        run = graphs.GraphedCalls("probe")
        def sync_while_capturing(y):  # warm-ups may synchronize once (lazy initialisation): only the capture
            if torch.cuda.is_current_stream_capturing():
                t._sync(y)
        fn = t._Calls(m.model, range(1, 10), sync_while_capturing)
        for i in range(3):
            x, cond, opts = t._inputs(400 + i)
            err = (run(fn, x, cond, opts)["y"].float() - m.model(x, cond, opts)["y"].float()).abs().max().item()
            assert err < 2e-3, err
            print("failed-capture call", i, "ok", flush=True)
        assert run.disabled.startswith("capture failed"), run.disabled
        import gc; gc.collect()
        run2 = graphs.GraphedCalls("probe")  # its buffers are kept, once: no second capture in this process
        x, cond, opts = t._inputs(410)
        run2(m.model, x, cond, opts)
        assert "until ComfyUI restarts" in run2.disabled and run2.captures == 0, run2.disabled
    else:
        for r in range(2):  # two sampling runs: graphs freed at the end of each
            run = graphs.GraphedCalls("probe")
            for i in range(4):
                x, cond, opts = t._inputs(300 + 10 * r + i)
                ref = m.model(x, cond, opts)["y"]
                out = run(m, x, cond, opts)["y"]
                cache.clear()  # a captured buffer freed right after the capture
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                assert err < 2e-3, err
                print("run", r, "call", i, "ok", flush=True)
            assert (run.captures, run.replays, run.disabled) == (1, 3, None), (run.captures, run.replays, run.disabled)
            run.close()
    torch.cuda.synchronize()
print("PROBE-OK")
"""


def _probe(scenario: str):
    import os
    import subprocess
    import sys
    from pathlib import Path
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
    code = _ASYNC_PROBE.format(tests=tests, repo=str(Path(tests).parent), scenario=scenario)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return r, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[:3000]}"


@cuda
def test_capture_and_replay_under_the_cuda_malloc_async_allocator():
    """ComfyUI runs with PyTorch's cudaMallocAsync backend by default; capturing there aborted the server process
    (a captured buffer freed before the graph's first launch). The backend is chosen per process: a child runs
    the replay check with a buffer freed right after the capture; with the first launch skipped (the old code) the
    same child must fail, which shows the check can see the defect."""
    r, text = _probe("replay")
    assert r.returncode == 0 and "PROBE-OK" in r.stdout, text
    r, text = _probe("no-first-launch")
    assert r.returncode != 0, "the probe passed without the first launch: it cannot see the defect\n" + text


@cuda
def test_a_failed_capture_under_cuda_malloc_async_leaves_the_process_running():
    """A capture that fails under cudaMallocAsync: eager from then on, graphs off for the process, the process
    lives; freeing the failed capture's tensors instead (the old code) aborts the child."""
    r, text = _probe("failed-capture")
    assert r.returncode == 0 and "PROBE-OK" in r.stdout, text
    r, text = _probe("failed-capture-freed")
    assert r.returncode != 0, "the probe passed with the failed capture's tensors freed: it cannot see the defect\n" + text
