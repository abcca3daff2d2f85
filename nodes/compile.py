"""ConvRot Compile Blocks: torch.compile each transformer block (FLUX's double/single blocks, the blocks of FLUX.2,
Chroma, Qwen-Image, Wan...) instead of the whole model.

After the linears run in W4A4, a sampling step is dominated by the work between them (LayerNorm + modulation, RoPE,
GELU, gated residuals, one launch each) and by launch gaps. Inductor fuses that elementwise work. ComfyUI's stock
TorchCompileModel compiles the whole diffusion model as one graph (57 FLUX blocks unrolled: minutes of compilation);
here every double and every single block is compiled on its own. Blocks of one kind share their code, so Dynamo
compiles one graph per kind and reuses it for the others (tens of seconds), and ConvRot's ops, registered with
fake kernels, trace without graph breaks. It uses ComfyUI's own compile wrapper, so the MODEL keeps its patches,
LoRAs and sampler behaviour; it works on bf16 models as well.
"""
from __future__ import annotations

import functools
import logging
import os
import weakref

import torch

from comfy_api.latest import io

from ..convrot.graphs import async_allocator
from .ops import quantized_layers

log = logging.getLogger("convrot")

def _skip_transformer_options(guard_entries):
    # the same guard filter as ComfyUI's TorchCompileModel: transformer_options changes per block (block_index) and
    # per step; guarding on it would recompile for every block
    return [("transformer_options" not in entry.name) for entry in guard_entries]


def block_keys(model_patcher) -> list[str]:
    """`diffusion_model.double_blocks.0`, ... : every repeated block of the diffusion model, found as families.py
    finds block layers (a top-level module list named `blocks`, `transformer_blocks`, `layers`, `noise_refiner`...)."""
    from ..convrot.families import BLOCK_LIST
    dm = model_patcher.get_model_object("diffusion_model")
    # a list of containers (a UNet's input_blocks of TimestepEmbedSequential, Stable Cascade's lists of lists) is
    # iterated by its model, not called: a compiled element could not be iterated
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    keys = [f"diffusion_model.{name}.{i}" for name, child in dm.named_children()
            if isinstance(child, torch.nn.ModuleList) and BLOCK_LIST.fullmatch(name)
            and not any(isinstance(b, containers) for b in child) for i in range(len(child))]
    if not keys:
        raise ValueError(f"ConvRot Compile Blocks: {type(dm).__name__} has no list of transformer blocks (no "
                         f"`blocks`/`double_blocks`/`layers`-style module list); use ComfyUI's TorchCompileModel "
                         f"instead")
    return keys


_cpp_build_failed: list[str] = []  # why a C++-wrapper build failed in this process: not tried again


def cpp_wrapper_unavailable() -> str | None:
    """Why Inductor cannot write C++ wrappers for CUDA here (None: it can): the C++ compiler it would use (asked of
    Inductor itself: g++ or $CXX on Linux, cl on Windows), the CUDA toolkit's headers its CUDA wrappers include
    (PyTorch's pip wheels ship the runtime, not the headers), or an earlier failed build in this process."""
    if _cpp_build_failed:
        return _cpp_build_failed[0]
    return _toolchain_missing()


@functools.lru_cache(maxsize=None)
def _toolchain_missing() -> str | None:
    """The toolchain part of cpp_wrapper_unavailable: fixed for the process, and the compiler search runs it."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - any failure means no C++ wrappers; the Python ones still work
        return f"Inductor found no C++ compiler for its C++ wrappers ({type(e).__name__}: {str(e)[:120]})"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # noqa: BLE001
        return f"torch.utils.cpp_extension is not importable ({type(e).__name__})"
    if not CUDA_HOME or not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return ("no CUDA toolkit headers were found (CUDA_HOME), which Inductor's C++ wrappers for CUDA include")
    return None


def compile_blocks(model_patcher, backend: str = "inductor", mode: str | None = None,
                   uncompiled_with_lora: bool = False, cpp_wrapper: bool | None = None,
                   uncompiled_on_failure: bool = False):
    """A clone of `model_patcher` whose transformer blocks run torch.compile'd (compiled lazily, on the first step).

    `cpp_wrapper` (Inductor only; None: under cudaMallocAsync, where the toolchain allows it): Inductor's generated
    code launches its kernels from C++ rather than through Triton's Python launchers. Those launchers check every
    pointer with the driver, which fails for buffers allocated while a CUDA graph is captured under cudaMallocAsync (ComfyUI's
    default allocator); the C++ wrapper does not, so its blocks can be replayed as CUDA graphs under any allocator
    (bench/NOTES.md, Session 8). Its first compilation takes longer (a C++ build per graph, cached on disk).

    `uncompiled_with_lora` (the loader's speed=auto): the compiled blocks step aside for a sampling run in which
    LoRA branches sit on quantized layers. Compiled, each patched layer runs outside the graph (a graph break per
    layer: 0.76x of bf16 in the server, bench/NOTES.md Session 6); uncompiled, the branch runs next to the GEMM
    (folded into it on Hopper) and the step can still be replayed as a CUDA graph.

    `uncompiled_on_failure` (speed=auto, which the user did not ask to compile): a compilation that fails runs the
    blocks uncompiled from then on, with one warning, instead of failing the prompt."""
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY

    keys = block_keys(model_patcher)
    inductor = backend == "inductor"
    if cpp_wrapper is None:  # under the native allocator Python launchers capture as well, and compile faster
        cpp_wrapper = inductor and async_allocator() and cpp_wrapper_unavailable() is None
    options = {"guard_filter_fn": _skip_transformer_options}
    if inductor and cpp_wrapper:
        options["cpp_wrapper"] = True
    m = model_patcher.clone(disable_dynamic=True)  # as TorchCompileModel: dynamic VRAM's lazy weights don't trace
    set_torch_compile_wrapper(model=m, backend=backend, mode=mode, keys=keys, options=options)
    compiled = m.get_wrappers(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    fallback = None
    if inductor and cpp_wrapper:
        def fallback():
            from comfy_api.torch_helpers.torch_compile import apply_torch_compile_factory
            plain = {k: v for k, v in options.items() if k != "cpp_wrapper"}
            return apply_torch_compile_factory({key: torch.compile(m.get_model_object(key), backend=backend,
                                                                   mode=mode, options=plain) for key in keys})
    for w in compiled:
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY,
                               _described(w, python_launchers=inductor and not cpp_wrapper,
                                          uncompiled_with_lora=uncompiled_with_lora, fallback=fallback,
                                          uncompiled_on_failure=uncompiled_on_failure,
                                          not_capturable=CUDAGRAPHS_BACKEND if backend == "cudagraphs" else None))
    log.info("ConvRot: %d blocks will be compiled with torch.compile(%s%s) on the first step", len(keys), backend,
             ", C++ wrapper" if inductor and cpp_wrapper else "")
    return m


def has_lora_branches(diffusion_model) -> bool:
    """Whether any quantized layer of the model carries patches applied as branches (nodes/lora.py)."""
    return any(m.convrot_patches for _, m in quantized_layers(diffusion_model))


def _cpp_build_failure(error: BaseException) -> bool:
    """Whether `error` is a C++ build failing (the compiler's error, a missing toolkit, a failed subprocess), found
    anywhere in its chain: a Triton compile error or an out-of-memory while autotuning is not one."""
    import subprocess
    import torch._inductor.exc as inductor_exc
    kinds = tuple(k for k in (getattr(inductor_exc, "CppCompileError", None), OSError,
                              subprocess.CalledProcessError) if k is not None)
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__ or getattr(error, "inner_exception", None)
    return False


def _compile_failure(error: BaseException) -> bool:
    """Whether `error` may be torch.compile failing (Dynamo, AOTAutograd, Inductor or Triton raised it) rather than
    the model; an out-of-memory anywhere in the chain is left to ComfyUI. A model's error raised while Dynamo
    traces matches too: the uncompiled rerun tells them apart (_described)."""
    seen = set()
    found = False
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError):
            return False
        mod = type(error).__module__ or ""
        found = found or mod.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton."))
        seen.add(id(error))
        error = error.__cause__ or error.__context__ or getattr(error, "inner_exception", None)
    return found


# Dynamo's cudagraphs backend records CUDA graphs itself; a capture around it would nest captures
CUDAGRAPHS_BACKEND = "the blocks are compiled with the cudagraphs backend, which records CUDA graphs itself"


def _described(compiled_wrapper, python_launchers: bool, uncompiled_with_lora: bool, fallback=None,
               not_capturable: str | None = None, uncompiled_on_failure: bool = False):
    """ComfyUI's compile wrapper, with what nodes/graph.py needs to know about it as attributes: whether its kernels
    start through Triton's Python launchers (`convrot_python_launchers`) and, for speed=auto, a test for the runs
    it steps aside for (`convrot_uncompiled_for`).

    `fallback` (C++-wrapper builds): makes the same compile wrapper with Python launchers. The C++ wrapper needs
    more of the toolchain than Triton's launchers do (a C++ compiler that builds against PyTorch's headers); when
    building it fails, the blocks are compiled again the usual way, once, with one warning, and the call is run
    again from its inputs (a block kind compiles at its first call, so blocks of another kind may have run; the
    model call has no side effects, and that partial work is discarded). `uncompiled_on_failure`: any other
    compilation failure reruns the call, and every later one, uncompiled (see compile_blocks)."""
    logged = []
    current = [compiled_wrapper, fallback]
    layers: dict = {}  # id(diffusion model) -> (weak reference, its quantized layers): a walk of ~1,100 modules
    #                    costs ms per step; the layers themselves do not change

    def steps_aside(dm) -> bool:
        if not uncompiled_with_lora:
            return False
        entry = layers.get(id(dm))
        if entry is None or entry[0]() is not dm:
            entry = layers[id(dm)] = (weakref.ref(dm), [m for _, m in quantized_layers(dm)])
        return any(m.convrot_patches for m in entry[1])

    def wrapper(executor, *args, **kwargs):
        if steps_aside(executor.class_obj.diffusion_model):
            if not logged:
                logged.append(True)
                log.info("ConvRot: LoRA branches on quantized layers: this model's blocks run uncompiled (compiled, "
                         "each patched layer would break the graph); steps are still replayed as CUDA graphs where "
                         "possible")
            return executor(*args, **kwargs)
        while current[0] is not None:
            try:
                return current[0](executor, *args, **kwargs)
            except Exception as e:
                if current[1] is not None and _cpp_build_failure(e):
                    _cpp_build_failed.append(f"building Inductor's C++ wrapper failed earlier in this process "
                                             f"({type(e).__name__})")
                    log.warning("ConvRot: Inductor's C++ wrapper failed to build (%s: %s); the blocks are compiled "
                                "with Triton's Python launchers instead (under cudaMallocAsync their steps are not "
                                "replayed as CUDA graphs)", type(e).__name__,
                                str(e).strip().splitlines()[0][:200] if str(e) else "")
                    current[:] = [current[1](), None]
                    wrapper.convrot_python_launchers = True
                    continue  # the same call, compiled the other way (its failure is handled here too)
                if not (uncompiled_on_failure and _compile_failure(e)):
                    raise
                failed = f"{type(e).__name__}: " + " ".join(ln.strip() for ln in str(e).strip().splitlines()[:2])
            # outside the handler, so the failed trace's frames are released first. A model's own error can surface
            # from Dynamo's tracing too: it is one if the uncompiled call fails as well, and then it propagates and
            # the blocks stay compiled for the next prompt.
            y = executor(*args, **kwargs)
            log.warning("ConvRot: compiling the blocks failed (%s); this model's steps run uncompiled from now on "
                        "(slower; the same result)", failed[:240])
            current[:] = [None, None]
            wrapper.convrot_python_launchers = False
            return y
        return executor(*args, **kwargs)
    wrapper.convrot_uncompiled_for = steps_aside
    wrapper.convrot_python_launchers = python_launchers
    wrapper.convrot_not_capturable = not_capturable
    return wrapper


class ConvRotCompileBlocks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConvRotCompileBlocks",
            display_name="ConvRot Compile Blocks",
            category="model/optimization",
            description="torch.compile every transformer block separately (one compilation per block kind, tens of "
                        "seconds on the first step) so the work between the quantized linears is fused. Needs a "
                        "working torch.compile (Triton on the GPU). Works on ConvRot and floating-point models of "
                        "every family the loader supports (FLUX.1/.2, Chroma, Qwen-Image, Wan...).",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("backend", options=["inductor", "cudagraphs"], default="inductor", advanced=True),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, backend="inductor") -> io.NodeOutput:
        return io.NodeOutput(compile_blocks(model, backend))
