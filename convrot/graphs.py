"""Replay whole model calls as CUDA graphs.

Once the linears run in W4A4, a FLUX step on the H100 is host-bound: one compiled `mixed` step is 96 ms of GPU work
but 105 ms of wall time (eager: ~125 ms), because the host launches ~2000 kernels one by one, and every LoRA-patched
layer adds a few more launches. A CUDA graph records those launches once and replays them with one call, so a step
costs its GPU time.

`GraphedCalls` wraps one callable (ComfyUI's diffusion-model forward, see nodes/graph.py) for the lifetime of one
sampling run:
- A call is identified by its *signature*: the nesting of its arguments; shape, strides, dtype and device of every
  CUDA tensor; the value of every small CPU tensor and plain Python value; the identity of any other object.
  The first call with a new signature runs eagerly once (its result is returned; lazy initialisation, compilation
  and one-time checks happen there) and is then captured; later calls with that signature copy their CUDA tensors
  into the captured inputs and replay. Host-side decisions made while capturing are baked into the graph, which is
  why every plain value is part of the signature.
- A graph also bakes in the addresses of the model's weights: `guard` (optional) returns them, and a replay with
  a different answer than at capture time (weights replaced between calls) is refused.
- Anything that cannot be captured (a host synchronisation, a CPU tensor the model reads, weights that live on the
  CPU or move, a signature that changes on every call, out of memory) turns graphs off for the rest of the run with one log
  line naming the reason; the calls then run eagerly, so results never depend on whether a graph was used.
Graphs hold their inputs, outputs and intermediate buffers (one private memory pool per run); `close()` frees them.
"""
from __future__ import annotations

import enum
import logging
import uuid
from dataclasses import dataclass

import torch

log = logging.getLogger("convrot")

# CPU tensors up to this size are part of the signature by value (sigma schedules, flags); a larger one makes a
# call uncapturable: the graph would bake its values in if the model read it.
CPU_TENSOR_MAX_NUMEL = 256


class Uncapturable(Exception):
    """A call whose arguments a CUDA graph cannot stand in for."""


def signature(args, kwargs) -> tuple[tuple, list[torch.Tensor]]:
    """(signature, CUDA tensors in order) of a call; see the module docstring. Raises Uncapturable.

    The signature is flat: one (path, description) pair per argument leaf and container, so two signatures can
    be compared leaf by leaf and a difference named by its path (e.g. kwargs['transformer_options']['sigmas'])."""
    leaves: list = []
    tensors: list[torch.Tensor] = []
    _sig(args, "args", leaves, tensors)
    _sig(kwargs, "kwargs", leaves, tensors)
    return tuple(leaves), tensors


_VALUE_TYPES = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, uuid.UUID, enum.Enum)


def _sig(obj, path: str, leaves: list, tensors: list) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cuda":
            tensors.append(obj)
            leaves.append((path, ("cuda", tuple(obj.shape), obj.stride(), obj.dtype, obj.device.index,
                                  obj.requires_grad)))
        elif obj.numel() > CPU_TENSOR_MAX_NUMEL:
            raise Uncapturable(f"{path} is a {tuple(obj.shape)} tensor on {obj.device}")
        else:
            leaves.append((path, ("host", obj.dtype, tuple(obj.shape), tuple(obj.flatten().tolist()))))
    elif obj is None or isinstance(obj, _VALUE_TYPES):
        leaves.append((path, (type(obj).__name__, obj)))
    elif isinstance(obj, dict):
        leaves.append((path, ("dict", len(obj))))
        for k, v in obj.items():
            _sig(v, f"{path}[{k!r}]", leaves, tensors)
    elif isinstance(obj, (list, tuple)):
        leaves.append((path, (type(obj).__name__, len(obj))))
        for i, v in enumerate(obj):
            _sig(v, f"{path}[{i}]", leaves, tensors)
    else:  # functions, modules, patch objects: the same object within a run
        leaves.append((path, ("object", type(obj).__name__, id(obj))))


def _rebuild(obj, it):
    """`obj` with its CUDA tensors replaced, in signature order, by the next items of `it`."""
    if isinstance(obj, torch.Tensor):
        return next(it) if obj.device.type == "cuda" else obj
    if isinstance(obj, dict):
        return {k: _rebuild(v, it) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return _same_sequence(obj, [_rebuild(v, it) for v in obj])
    return obj


def _same_sequence(like, items):
    if hasattr(like, "_fields"):  # a named tuple
        return type(like)(*items)
    return type(like)(items)


def _detach_output(out):
    """A fresh copy of a graph's (static) output: the next replay overwrites the static one."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return _same_sequence(out, [_detach_output(v) for v in out])
    if isinstance(out, dict):
        return {k: _detach_output(v) for k, v in out.items()}
    return out


def _first_difference(a: tuple, b: tuple) -> str:
    for (pa, da), (pb, db) in zip(a, b):
        if pa != pb or da != db:
            return pa
    return "the number of arguments"


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: list
    output: object


class GraphedCalls:
    """Calls of one function, captured per signature and replayed; one instance per sampling run."""

    def __init__(self, name: str = "ConvRot CUDA Graph", max_graphs: int = 4, reraise: tuple = (), guard=None):
        self.name = name
        self.guard = guard                # () -> hashable: the weights' addresses; must not change between calls
        self.max_graphs = max_graphs
        self.reraise = reraise            # exceptions that must propagate (ComfyUI's interrupt), never a fallback
        self.graphs: dict[tuple, _Graph] = {}
        self.disabled: str | None = None  # why calls run eagerly for the rest of the run
        self.captures = self.replays = self.eager = 0
        self._pool = None
        self._last_sig = None
        self._guard_value = None

    def disable(self, reason: str) -> None:
        if self.disabled is None:
            self.disabled = reason
            log.warning("%s: running eagerly for the rest of this run: %s", self.name, reason)
            self.close()

    def close(self) -> None:
        self.graphs.clear()
        self._pool = None

    def __call__(self, fn, *args, **kwargs):
        if self.disabled is None:
            try:
                sig, tensors = signature(args, kwargs)
            except Uncapturable as e:
                self.disable(f"{e} (not capturable)")
            else:
                g = self.graphs.get(sig)
                if g is not None and self.guard is not None and self.guard() != self._guard_value:
                    self.disable("the model's weights were replaced since the capture (hooks or offloading)")
                elif g is not None:
                    return self._replay(g, tensors)
                if not tensors:
                    self.disable("the call has no CUDA tensor")
                elif len(self.graphs) >= self.max_graphs:
                    where = _first_difference(self._last_sig, sig)
                    self.disable(f"more than {self.max_graphs} different calls (the last two differ at {where})")
                else:
                    self._last_sig = sig
                    return self._capture(sig, tensors, fn, args, kwargs)
        self.eager += 1
        return fn(*args, **kwargs)

    def _replay(self, g: _Graph, tensors) -> object:
        torch._foreach_copy_(g.inputs, tensors)
        g.graph.replay()
        self.replays += 1
        return _detach_output(g.output)

    def _capture(self, sig, tensors, fn, args, kwargs):
        inputs = [t.clone() for t in tensors]
        s_args, s_kwargs = _rebuild((args, kwargs), iter(inputs))
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream(device=tensors[0].device)
        side.wait_stream(cur)
        # the warm-up call is this call's real result; it runs on the stream the capture will use, so per-stream
        # lazy state (cuBLAS workspaces) and every first-call check or compilation happen before capturing
        with torch.cuda.stream(side):
            out = fn(*s_args, **s_kwargs)
        cur.wait_stream(side)
        out = _detach_output(out)  # allocated on the current stream: it outlives this call
        self.eager += 1
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        guard_value = self.guard() if self.guard is not None else None
        if self.graphs and guard_value != self._guard_value:
            self.disable("the model's weights were replaced since the last capture (hooks or offloading)")
            return out
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                g_out = fn(*s_args, **s_kwargs)
        except self.reraise:
            raise
        except torch.cuda.OutOfMemoryError:
            del graph
            self.disable("out of GPU memory while capturing")
            torch.cuda.empty_cache()
            return out
        except Exception as e:  # noqa: BLE001 - anything the model does that a graph can't hold
            del graph
            self.disable(f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})")
            return out
        torch.cuda.empty_cache()  # the warm-up's blocks cached for the side stream are not reusable by the model
        self.graphs[sig] = _Graph(graph, inputs, g_out)
        self._guard_value = guard_value
        self.captures += 1
        log.info("%s: captured graph %d of this run", self.name, len(self.graphs))
        return out
