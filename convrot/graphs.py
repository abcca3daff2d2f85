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
- A first call that synchronizes with the host (a one-time check, a compilation) gets a second warm-up; a model
  that synchronizes on every call is never captured, since a capture failing inside CUDA is not undone cleanly
  (if one fails anyway, the stream and the allocator are restored and graphs stay off for the process).
- Anything else that cannot be captured (a CPU tensor the model could read, an object holding GPU tensors, weights
  that live on the CPU or move, a signature that changes on every call, out of memory) turns graphs off for the
  rest of the run with one log line naming the reason; the calls then run eagerly, so results never depend on
  whether a graph was used.
Graphs hold their inputs, outputs and intermediate buffers (one private memory pool per run); `close()` frees them.
"""
from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import uuid
import warnings
from dataclasses import dataclass

import torch

log = logging.getLogger("convrot")

# CPU tensors up to this size are part of the signature by value (sigma schedules, flags); a larger one makes a
# call uncapturable: the graph would bake its values in if the model read it.
CPU_TENSOR_MAX_NUMEL = 256


class Uncapturable(Exception):
    """A call whose arguments a CUDA graph cannot stand in for."""


def signature(args, kwargs, objects: list | None = None) -> tuple[tuple, list[torch.Tensor]]:
    """(signature, CUDA tensors in order) of a call; see the module docstring. Raises Uncapturable.

    The signature is flat: one (path, description) pair per argument leaf and container, so two signatures can
    be compared leaf by leaf and a difference named by its path (e.g. kwargs['transformer_options']['sigmas'])."""
    leaves: list = []
    tensors: list[torch.Tensor] = []
    objects = [] if objects is None else objects
    _sig(args, "args", leaves, tensors, objects)
    _sig(kwargs, "kwargs", leaves, tensors, objects)
    return tuple(leaves), tensors


_VALUE_TYPES = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, uuid.UUID, enum.Enum)


def _sig(obj, path: str, leaves: list, tensors: list, objects: list) -> None:
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
            _sig(v, f"{path}[{k!r}]", leaves, tensors, objects)
    elif isinstance(obj, (list, tuple)):
        leaves.append((path, (type(obj).__name__, len(obj))))
        for i, v in enumerate(obj):
            _sig(v, f"{path}[{i}]", leaves, tensors, objects)
    else:  # functions, modules, patch objects: the same object within a run
        held = [k for k, v in getattr(obj, "__dict__", {}).items()
                if isinstance(v, torch.Tensor) and v.device.type == "cuda"]
        if held:  # tensors the graph would read at their capture-time addresses, untracked
            raise Uncapturable(f"{path} ({type(obj).__name__}) holds GPU tensors ({', '.join(held[:3])})")
        objects.append(obj)
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


def _summary(e: BaseException) -> str:
    """`Type: first line of the message` (cut), for a log line."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


@contextlib.contextmanager
def _sync_debug(mode: str):
    """PyTorch's sync debug mode set for a block (process-wide), the previous one restored after it."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def async_allocator() -> bool:
    """Whether PyTorch uses the cudaMallocAsync allocator backend (ComfyUI's default on NVIDIA GPUs)."""
    try:
        return torch.cuda.is_available() and torch.cuda.get_allocator_backend() == "cudaMallocAsync"
    except Exception:  # noqa: BLE001 - an uninitialisable CUDA: no graphs are captured anyway
        return False


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: list
    output: object
    objects: list  # the objects the signature names by identity, kept alive so their ids are not reused


class GraphedCalls:
    """Calls of one function, captured per signature and replayed; one instance per sampling run."""

    # Set when a capture failed inside CUDA (not just in Python): the caching allocator may then still route a
    # stream's allocations to the graph pool, so no graph is captured again in this process.
    broken: str | None = None
    _failed: list = []  # failed captures under cudaMallocAsync, never freed (see _keep_failed)

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

    def disable(self, reason: str, level: int = logging.WARNING) -> None:
        if self.disabled is None:
            self.disabled = reason
            log.log(level, "%s: running eagerly for the rest of this run: %s", self.name, reason)
            self.close()

    def close(self) -> None:
        self.graphs.clear()
        self._pool = None

    def __call__(self, fn, *args, **kwargs):
        if self.disabled is None and GraphedCalls.broken is not None:
            self.disable(GraphedCalls.broken)
        if self.disabled is None:
            objects: list = []
            try:
                sig, tensors = signature(args, kwargs, objects)
            except Uncapturable as e:
                self.disable(f"{e} (not capturable)")
            else:
                g = self.graphs.get(sig)
                if g is not None:
                    if self.guard is None or self.guard() == self._guard_value:
                        return self._replay(g, tensors)
                    self.disable("the model's weights were replaced since the capture (hooks or offloading)")
                elif not tensors:
                    self.disable("the call has no CUDA tensor")
                elif len(self.graphs) >= self.max_graphs:
                    where = _first_difference(self._last_sig, sig)
                    self.disable(f"more than {self.max_graphs} different calls (the last two differ at {where})")
                else:
                    self._last_sig = sig
                    with torch.cuda.device(tensors[0].device):
                        return self._capture(sig, tensors, objects, fn, args, kwargs)
        self.eager += 1
        return fn(*args, **kwargs)

    def _replay(self, g: _Graph, tensors) -> object:
        torch._foreach_copy_(g.inputs, tensors)
        g.graph.replay()
        self.replays += 1
        return _detach_output(g.output)

    def _warm_up(self, fn, args, kwargs, side, cur):
        """One eager call on the capture stream; returns (output, whether it synchronized with the host)."""
        side.wait_stream(cur)
        with warnings.catch_warnings(record=True) as seen, torch.cuda.stream(side), _sync_debug("warn"):
            warnings.simplefilter("always")
            out = fn(*args, **kwargs)
        cur.wait_stream(side)
        synced = False
        for w in seen:
            if "synchroniz" in str(w.message):
                synced = True
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return _detach_output(out), synced  # copied on the current stream: it outlives this call

    def _capture(self, sig, tensors, objects, fn, args, kwargs):
        inputs = [t.clone() for t in tensors]
        s_args, s_kwargs = _rebuild((args, kwargs), iter(inputs))
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        # The warm-up call is this call's result. It runs on the capture stream, so per-stream lazy state (cuBLAS
        # workspaces), first-call checks and compilation happen before capturing. A host synchronisation would
        # make the capture fail, which CUDA does not undo cleanly: a first call may synchronize once (one-time
        # checks, compilation), so a second warm-up decides.
        out, synced = self._warm_up(fn, s_args, s_kwargs, side, cur)
        self.eager += 1
        if synced:
            _, synced = self._warm_up(fn, s_args, s_kwargs, side, cur)
            if synced:
                self.disable("the model synchronizes with the host on every call (a .item() or .cpu() in a patch?)")
                torch.cuda.empty_cache()
                return out
        guard_value = self.guard() if self.guard is not None else None
        if self.graphs and guard_value != self._guard_value:
            self.disable("the model's weights were replaced since the last capture (hooks or offloading)")
            torch.cuda.empty_cache()
            return out
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                # A host synchronisation while capturing invalidates the capture, and under cudaMallocAsync every
                # tensor freed after that is a failing cudaFreeAsync inside a deleter: the process aborts. With
                # sync debugging set to "error" PyTorch raises before synchronizing, so the capture ends cleanly.
                # Set inside the block: entering it synchronizes on purpose. The mode is process-wide, so a sync
                # in another thread during these milliseconds raises too (ComfyUI samples in one thread).
                with _sync_debug("error"):
                    g_out = fn(*s_args, **s_kwargs)
        except BaseException as e:
            self._recover(graph, cur, e)
            if async_allocator():
                self._keep_failed(graph, e, "a capture")
            if isinstance(e, self.reraise) or not isinstance(e, Exception):
                raise
            reason = ("out of GPU memory while capturing" if isinstance(e, torch.cuda.OutOfMemoryError) else
                      f"capture failed ({_summary(e)})")
            self.disable(reason)
            torch.cuda.empty_cache()
            return out
        if async_allocator():
            # Launched at once, before anything else runs: under cudaMallocAsync a buffer allocated while capturing
            # exists only once the graph has been launched, so a captured tensor that Python frees before the first
            # replay (a cache the call refreshed, a reference cycle collected late) is an invalid cudaFreeAsync,
            # raised inside a tensor deleter: the process aborts (bench/NOTES.md, Session 6).
            try:
                self._first_launch(graph)
            except BaseException as e:  # e.g. out of memory: the graph's buffers are allocated by this launch
                self._keep_failed((graph, g_out), e, "a captured graph's first launch")
                if isinstance(e, self.reraise) or not isinstance(e, Exception):
                    raise
                self.disable(f"the graph's first launch failed ({_summary(e)})")
                return out
        torch.cuda.empty_cache()  # the warm-up's blocks cached for the side stream are not reusable by the model
        self.graphs[sig] = _Graph(graph, inputs, g_out, objects)
        self._guard_value = guard_value
        self.captures += 1
        log.info("%s: captured graph %d of this run", self.name, len(self.graphs))
        return out

    @staticmethod
    def _keep_failed(held, error: BaseException, what: str) -> None:
        """cudaMallocAsync: what a failed capture allocated was never launched, so freeing it is an invalid
        cudaFreeAsync inside a tensor deleter, which aborts the process. The graph and the exception (whose frames
        hold those tensors) are kept for the life of the process, and past it, and graphs stay off so that this happens once."""
        kept = (held, error)
        # a list entry alone is dropped when the interpreter clears module globals at exit, and that free aborts
        # an exiting ComfyUI (seen on the H200, Session 8): one reference that nothing ever releases
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(kept))
        GraphedCalls._failed.append(kept)
        if GraphedCalls.broken is None:
            GraphedCalls.broken = (f"{what} failed under the cudaMallocAsync allocator ({type(error).__name__}); its "
                                   f"buffers cannot be freed, so CUDA graphs are off until ComfyUI restarts")
            log.warning("ConvRot CUDA Graph: %s", GraphedCalls.broken)

    @staticmethod
    def _first_launch(graph) -> None:
        graph.replay()

    def _recover(self, graph, cur, error) -> None:
        """Undo what an interrupted capture leaves behind: a failing capture_end skips restoring the current stream
        and the allocator's routing of the capture stream's allocations to the graph pool."""
        torch.cuda.set_stream(cur)
        try:
            torch._C._cuda_endAllocateToPool(cur.device_index, self._pool)
        except Exception:  # noqa: BLE001 - capture_end got that far: the allocator is consistent
            return
        GraphedCalls.broken = (f"an earlier capture failed inside CUDA ({type(error).__name__}); CUDA graphs are off "
                               f"until ComfyUI restarts")
        log.warning("%s: %s", self.name, GraphedCalls.broken)
