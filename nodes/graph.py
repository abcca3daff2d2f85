"""ConvRot CUDA Graph: replay each sampling step's diffusion-model call as a CUDA graph (convrot/graphs.py).

Two ComfyUI wrappers on a clone of the MODEL: OUTER_SAMPLE opens a fresh set of graphs for each sampling run and
frees it when the run ends (a run's LoRA buffers, shapes and weights are fixed for its length), DIFFUSION_MODEL
routes the model's forward through it. The first step of a run runs eagerly and captures; the others replay.
Models not entirely on the GPU (low-VRAM offloading), CPU runs and anything the capture can't hold run eagerly,
with one log line saying why. Chain it after the loader, LoRAs and ConvRot Compile Blocks (order does not matter
for the result; it wraps whatever the model does at sampling time).
"""
from __future__ import annotations

import contextlib
import logging

import torch

from comfy_api.latest import io

from ..convrot.graphs import GraphedCalls, async_allocator

log = logging.getLogger("convrot")

WRAPPER_KEY = "convrot_cuda_graph"
NAME = "ConvRot CUDA Graph"


class RunGraphs:
    """The graphs of the sampling runs in progress (innermost last); `last` keeps the previous run's counters."""

    def __init__(self, max_graphs: int = 4):
        self.max_graphs = max_graphs
        self.runs: list[GraphedCalls] = []
        self.last: GraphedCalls | None = None

    def outer_sample(self, executor, *args, **kwargs):
        import comfy.model_management
        run = GraphedCalls(NAME, self.max_graphs, reraise=(comfy.model_management.InterruptProcessingException,))
        self.runs.append(run)
        try:
            return executor(*args, **kwargs)
        finally:
            self.runs.remove(run)
            run.close()
            run.guard = None  # it holds the model's parameter dicts: kept, `last` would keep the weights alive
            self.last = run
            if run.captures or run.replays:
                log.info("%s: %d graph(s) captured, %d steps replayed, %d eager", NAME, run.captures, run.replays,
                         run.eager)

    def diffusion_model(self, executor, *args, **kwargs):
        if not self.runs:  # called outside a sampling run (another node using the model): nothing to reuse
            return executor(*args, **kwargs)
        run = self.runs[-1]
        if run.disabled is None and not (run.graphs or run.eager):  # the run's first call
            reason = _not_capturable(executor.class_obj, args, kwargs)
            if reason:
                run.disable(reason)
            elif async_allocator() and _python_launched(executor.class_obj, args, kwargs):
                run.disable(ASYNC_COMPILED, logging.INFO)  # expected with ComfyUI's defaults: not a warning
            else:
                run.guard = weight_addresses(executor.class_obj)
        if run.disabled is None:
            with comfy_compiler_off():
                return run(executor, *args, **kwargs)
        return run(executor, *args, **kwargs)


@contextlib.contextmanager
def comfy_compiler_off():
    """Newer ComfyUI (the "Comfy Compiler", comfy/model_prefetch.py) records aimdo allocation plans and per-block CUDA
    graphs from inside the model's forward unless `--disable-comfy-compiler`; inside this node's capture of a whole
    step that would record a graph within a graph. Its switch is read on every call (malloc_graph_enabled), so it is
    set for the length of a call this node captures or replays. A ComfyUI without the switch: nothing to do."""
    import comfy.cli_args
    args = comfy.cli_args.args
    if getattr(args, "disable_comfy_compiler", True):
        yield
        return
    args.disable_comfy_compiler = True
    try:
        yield
    finally:
        args.disable_comfy_compiler = False


def _not_capturable(model: torch.nn.Module, args, kwargs) -> str | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        return "the model runs on the CPU (CUDA graphs need an NVIDIA GPU)"
    options = [a for a in list(args) + list(kwargs.values()) if isinstance(a, dict)]
    if any(o.get("multigpu_thread_device") is not None for o in options):
        # ComfyUI's multi-GPU sampling calls the model from one thread per device, all through this wrapper
        return "multi-GPU sampling (the model is called from several threads)"
    for w in _compile_wrappers(options):
        if getattr(w, "convrot_not_capturable", None):
            return w.convrot_not_capturable
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cuda":
            return f"{name} is not on the GPU (low-VRAM offloading); load the model fully to use CUDA graphs"
    return None


def _compile_wrappers(dicts) -> list:
    """ComfyUI's compile wrappers (COMPILE_KEY) registered in the transformer_options among `dicts`."""
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY
    found = []
    for o in dicts:
        wrappers = o.get("wrappers", {})
        compiled = wrappers.get(WrappersMP.APPLY_MODEL, {}).get(COMPILE_KEY) if isinstance(wrappers, dict) else None
        found.extend(compiled or ())
    return found


# Triton's kernel launchers (Inductor's static one and Triton's own) check every pointer argument with the CUDA
# driver; a buffer that cudaMallocAsync allocates while capturing is not mapped until the graph is launched, so the
# check fails and so does the capture (bench/NOTES.md, Session 7). PyTorch's native allocator has no such buffers,
# and Inductor's C++ wrapper launches kernels without the check (Session 8).
ASYNC_COMPILED = ("kernels started by Triton's Python launchers (compiled blocks without Inductor's C++ wrapper, "
                  "ConvRot Quantized Attention, ConvRot's Triton route) cannot be captured under the cudaMallocAsync "
                  "allocator, ComfyUI's default; steps run without graphs (Compile Blocks and the loader's "
                  "speed=auto compile with the C++ wrapper where a C++ compiler and the CUDA toolkit's headers are "
                  "found; --disable-cuda-malloc allows graphs for all of them)")


def _cpp_wrapper_everywhere() -> bool:
    """Whether Inductor writes C++ wrappers for every compilation (TORCHINDUCTOR_CPP_WRAPPER=1)."""
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # noqa: BLE001 - no Inductor: nothing is compiled by it
        return False
    return bool(getattr(inductor_config, "cpp_wrapper", False))


def _python_launched(model: torch.nn.Module, args=(), kwargs=None) -> bool:
    """Whether this call runs Triton kernels started through Triton's Python launchers: ConvRot Quantized
    Attention's kernel (a custom op, Python even inside compiled code), ConvRot's Triton route, or torch.compile'd
    code without Inductor's C++ wrapper (ComfyUI's compile wrapper registered for the run: Compile Blocks,
    TorchCompileModel; or compiled modules swapped in)."""
    from ..convrot import routes
    dicts = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, dict)]
    if any(getattr(o.get("optimized_attention_override"), "convrot_python_launchers", False) for o in dicts):
        return True
    if "triton" in routes.decided().values():  # the Triton route (no CUDA extension, or forced): our own linears are Triton kernels
        return True
    if _cpp_wrapper_everywhere():
        return False
    if torch.compiler.is_compiling():
        return True
    registered = False
    for w in _compile_wrappers(dicts):
        registered = True
        aside = getattr(w, "convrot_uncompiled_for", None)  # speed=auto's wrapper runs LoRA models uncompiled
        if (aside is None or not aside(model)) and getattr(w, "convrot_python_launchers", True):
            return True
    # A registered wrapper has swapped its compiled modules into the model for this call (so they are seen below
    # whatever they launch with); without one, compiled modules were put there by someone else.
    return not registered and any(hasattr(m, "_orig_mod") for m in model.modules())


def weight_addresses(model: torch.nn.Module):
    """A guard for GraphedCalls: the addresses of every parameter and buffer of `model`, read through the module
    dicts (ComfyUI replaces a patched weight by a new Parameter; an in-place update keeps the address and is seen
    by the graph). Well under 0.1 ms per step for a FLUX model."""
    slots = [(d, k) for m in model.modules() for d in (m._parameters, m._buffers) for k, t in d.items()
             if t is not None]

    def addresses():
        return tuple(d[k].data_ptr() if d[k] is not None else 0 for d, k in slots)
    return addresses


def graph_model(model_patcher, max_graphs: int = 4):
    """A clone of `model_patcher` whose diffusion-model calls are captured and replayed as CUDA graphs."""
    from comfy.patcher_extension import WrappersMP
    m = model_patcher.clone(disable_dynamic=True)  # dynamic VRAM streams weights in per call: not capturable
    m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    graphs = RunGraphs(max_graphs)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, graphs.outer_sample)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, graphs.diffusion_model)
    return m


def run_graphs(model_patcher) -> RunGraphs | None:
    """The RunGraphs a graph_model() clone samples with (for benchmarks and tests)."""
    from comfy.patcher_extension import WrappersMP
    for w in model_patcher.get_wrappers(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        owner = getattr(w, "__self__", None)
        if isinstance(owner, RunGraphs):
            return owner
    return None


class ConvRotCUDAGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConvRotCUDAGraph",
            display_name=NAME,
            category="model/optimization",
            description="Replay each sampling step of the diffusion model as a CUDA graph: the first step of a run "
                        "records the model's GPU work, the others replay it without the per-kernel launch cost "
                        "(largest with LoRAs and without Compile Blocks). Needs the model fully on the GPU; "
                        "otherwise, or on the CPU, it runs eagerly and logs why. Works on any FLUX-style model.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(graph_model(model))
