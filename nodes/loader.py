"""ConvRot W4A4 Loader: a diffusion transformer file (FLUX.1, FLUX.2, Chroma, other DiTs ComfyUI detects) -> a
ComfyUI MODEL whose linear layers run in W4A4/W8A8."""
from __future__ import annotations

import collections
import logging
import os
import shutil


import torch

import comfy.model_detection
import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..convrot import families
from ..convrot.checkpoint import FP8_DTYPES, CheckpointError
from ..convrot.correction import DEFAULT_RANK, SUFFIX, split_preset
from ..convrot.convert import header_layer_confs, plan_file
from ..convrot.hadamard import SUPPORTED_GROUP_SIZES, check_group_size
from ..convrot.policy import PRESETS, parse_overrides
from . import lora
from .ops import LoadSpec, make_ops, quantized_layers

log = logging.getLogger("convrot")

PRESET_CHOICES = ["mixed", "w4a4", "compact", "w8a8", "mixed" + SUFFIX, "compact" + SUFFIX]
SPEED_CHOICES = ["auto", "eager"]
ACTIVATION_HEADROOM = 6 * 2**30  # a 1024² FLUX step's activations, the text encoders' leftovers and cuDNN workspace
GROUP_CHOICES = [str(g) for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True)]  # "256", "64", "16"


def _quant_device():
    """Quantize on the GPU ComfyUI computes on (not under --cpu, and not a different card than it uses)."""
    dev = comfy.model_management.get_torch_device()
    return dev if dev.type == "cuda" else None


def compute_dtype(infos, device) -> torch.dtype:
    """The dtype ComfyUI would run this file's float weights in (fp8 files: their bf16/fp16 compute dtype)."""
    floats = [i.dtype for k, i in infos.items() if k.endswith(".weight") and i.dtype.is_floating_point]
    src = max(set(floats), key=floats.count) if floats else torch.bfloat16
    if src in FP8_DTYPES:
        src = torch.bfloat16
    return comfy.model_management.unet_dtype(device=device, supported_dtypes=[torch.bfloat16, torch.float16,
                                                                              torch.float32], weight_dtype=src)


def comfy_image_model(infos, file_name: str) -> str | None:
    """The `image_model` ComfyUI's own detection finds in a file's header (shapes only: meta tensors), or None for
    a model it names otherwise. Refuses a file ComfyUI detects as no diffusion model at all."""
    sd = {k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in infos.items()}
    try:
        # the same prefix handling as comfy.sd.load_diffusion_model_state_dict
        prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
        if not any(k.startswith(prefix) for k in sd):
            prefix = ""
        config = comfy.model_detection.detect_unet_config(sd, prefix)
    except Exception as e:  # a detection rule that needs tensor values: the load itself will tell
        log.debug("ConvRot: %s: ComfyUI's detection on the header failed (%s: %s)", file_name, type(e).__name__, e)
        return None
    if config is None:
        raise CheckpointError(f"{file_name}: ComfyUI does not recognise this file's model from its tensor names (a "
                              f"diffusers-format file is converted to other names on load, which ConvRot cannot plan "
                              f"for; use the original-format file). ConvRot covers {families.SUPPORTED}")
    return config.get("image_model")


def check_family(plan_family: str, image_model: str | None, file_name: str) -> None:
    """ConvRot's family rules must be those of the model ComfyUI builds."""
    ours, theirs = families.by_name(plan_family), families.by_image_model(image_model)
    generic = ours in families.GENERIC
    if (theirs is not None and theirs is not ours) or (theirs is None and not generic and image_model is not None):
        raise CheckpointError(f"{file_name}: ComfyUI detects this file as image_model {image_model!r}, but its tensor "
                              f"names look like {ours.label} to ConvRot; refusing rather than quantizing the wrong "
                              f"layers")


def fast_path_unavailable(patcher) -> str | None:
    """Why the loader cannot compile the blocks and replay steps as CUDA graphs by itself, or None if it can.

    Safe means: an NVIDIA GPU, a working torch.compile (Triton and the C compiler it builds launchers with), and the
    whole model resident with room for a step (a CUDA graph replays fixed weight addresses, so weights that dynamic
    VRAM streams or evicts cannot be captured)."""
    dev = patcher.load_device
    if dev.type != "cuda":
        return f"the model runs on {dev.type}, not an NVIDIA GPU"
    from .compile import block_keys
    try:
        block_keys(patcher)
    except ValueError as e:
        return str(e)
    if os.environ.get("CONVROT_SPEED") == "eager":
        return "CONVROT_SPEED=eager"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"Triton is not importable ({type(e).__name__}), so torch.compile cannot build GPU kernels"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler was found (Triton compiles its kernel launchers with one)"
    mm = comfy.model_management
    if getattr(mm, "vram_state", None) is getattr(getattr(mm, "VRAMState", None), "NO_VRAM", ()):
        return ("--novram keeps the weights in CPU memory and moves them to the GPU for each use, so steps run "
                "eagerly")
    need = patcher.model_size() + ACTIVATION_HEADROOM
    # what ComfyUI itself may use: --reserve-vram (extra_reserved_memory) is held back from every load it plans
    reserved = getattr(mm, "extra_reserved_memory", lambda: 0)()
    free = mm.get_free_memory(dev) + patcher.loaded_size() - reserved
    if free < need:
        return (f"the model and a step need {need / 2**30:.1f} GB but {max(free, 0) / 2**30:.1f} GB of VRAM are "
                f"free to ComfyUI (after its reserved VRAM), so it streams the weights and steps run eagerly")
    return None


def with_speed(patcher, speed: str):
    """The patcher as `speed` asks: "auto" compiles every FLUX block and replays steps as CUDA graphs where that is
    safe (fast_path_unavailable), with one log line either way; "eager" leaves it as ComfyUI made it."""
    if speed == "eager":
        return patcher
    if speed != "auto":
        raise ValueError(f"ConvRot speed must be one of {SPEED_CHOICES}, got {speed!r}")
    reason = fast_path_unavailable(patcher)
    if reason is not None:
        log.info("ConvRot: steps run eagerly (no compiled blocks or CUDA graphs): %s", reason)
        return patcher
    from .compile import compile_blocks
    from .graph import graph_model
    from .compile import cpp_wrapper_unavailable
    from ..convrot.graphs import async_allocator
    from ..convrot import routes
    no_cpp = cpp_wrapper_unavailable()
    if async_allocator() and routes.route_for(patcher.load_device).name == "triton":
        log.info("ConvRot: blocks are compiled (the first step takes about a minute longer: compiling, and tuning "
                 "the Triton kernels); steps are not replayed as CUDA graphs: the Triton route's kernels start from "
                 "Python, which cannot be captured under ComfyUI's cudaMallocAsync allocator")
    elif no_cpp and async_allocator():
        log.info("ConvRot: blocks are compiled (the first step takes ~20 s longer); steps are not replayed as CUDA "
                 "graphs under ComfyUI's cudaMallocAsync allocator: %s", no_cpp)
    else:
        log.info("ConvRot: blocks are compiled and steps replayed as CUDA graphs (the first step takes %s longer "
                 "while compiling, less once Inductor's cache holds the code; set speed = eager on the loader to "
                 "turn this off)", "~45 s" if async_allocator() else "~20 s")
    # C++ wrapper where it matters; a failed compile runs uncompiled rather than failing the prompt
    return graph_model(compile_blocks(patcher, uncompiled_with_lora=True, uncompiled_on_failure=True))


def load_convrot_model(path: str, preset: str = "mixed", group_size: int | str = 256, overrides: str = "",
                       progress: bool = True, speed: str = "eager"):
    """Load a diffusion transformer file through ComfyUI with ConvRot layers; returns a ModelPatcher.

    Everything that can be checked from the header is checked before ComfyUI reads a tensor: truncation, the model
    family (convrot/families.py, and that ComfyUI detects the same model), per-layer quantization formats, group
    size and that at least one layer gets quantized.
    """
    name = os.path.basename(path)
    try:
        g = check_group_size(int(group_size))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from e
    asked, (preset, correction_rank) = preset, split_preset(preset)
    if preset not in PRESETS and preset != "quality":
        raise CheckpointError(f"{name}: unknown ConvRot preset {asked!r}; choose one of {PRESET_CHOICES}")
    try:
        parse_overrides(overrides)
    except ValueError as e:
        raise ValueError(f"ConvRot overrides: {e}") from e
    plan, infos, meta = plan_file(path, g, preset, overrides)  # raises CheckpointError naming file/layer
    check_family(plan.family, comfy_image_model(infos, name), name)
    confs = header_layer_confs(meta, name)
    n_layers = len(plan.actions)
    pbar = comfy.utils.ProgressBar(n_layers) if progress else None
    spec = LoadSpec.from_plan(
        name, g, plan.actions, confs,
        quant_device=_quant_device(), correction_rank=correction_rank,
        progress=(lambda layer: pbar.update(1)) if pbar is not None else None)
    try:
        dtype = compute_dtype(infos, comfy.model_management.get_torch_device())
        patcher = comfy.sd.load_diffusion_model(path, model_options={"custom_operations": make_ops(spec, dtype),
                                                                     "dtype": dtype})
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{name}: ComfyUI could not load this file with ConvRot layers "
                              f"({type(e).__name__}: {e})") from e
    layers = quantized_layers(patcher.model)
    if not layers:
        raise CheckpointError(f"{name}: no layer was quantized: ComfyUI built a model whose linear layers are not "
                              f"named as in the file ({families.by_name(plan.family).label} rules)")
    counts = collections.Counter(f"w{m.convrot_bits}a{m.convrot_bits}" for _, m in layers)
    log.info("ConvRot: %s (%s) loaded with preset %s, group size %d: %s quantized layers, %d kept in floating point",
             name, families.by_name(plan.family).label, asked, g, dict(counts), n_layers - len(layers))
    if correction_rank:
        corrected = sum(m.convrot_lr_down is not None for _, m in layers)
        w4 = sum(m.convrot_bits == 4 for _, m in layers)
        log.info("ConvRot: low-rank correction (rank %d) on %d of %d W4A4 layers%s", correction_rank, corrected, w4,
                 "" if corrected == w4 else " (the others were stored quantized in the file: a correction needs the "
                 "float weights)")
    lora.install(patcher)
    return with_speed(patcher, speed)


class ConvRotW4A4Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConvRotW4A4Loader",
            display_name="ConvRot W4A4 Loader",
            category="model/loaders",
            description="Load a diffusion transformer (FLUX.1, FLUX.2, Chroma, or another DiT ComfyUI detects, such "
                        "as Qwen-Image and Wan 2.x) and run its linear layers in 4-bit weights and activations "
                        "with ConvRot (regular-Hadamard group rotation). bf16/fp16/fp8 files are quantized while "
                        "loading; files saved by ConvRot Save Quantized load as stored.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A diffusion transformer (FLUX.1, FLUX.2, Chroma, Qwen-Image, Wan 2.x, ...) "
                                       "from models/diffusion_models."),
                io.Combo.Input("preset", options=PRESET_CHOICES, default="mixed",
                               tooltip="; ".join(f"{k}: {v}" for k, v in PRESETS.items())
                               + f"; PRESET{SUFFIX}: that preset with a calibration-free low-rank correction (rank "
                                 f"{DEFAULT_RANK}) on its W4A4 layers: closer to bf16, 5-8% more memory on those layers, a "
                                 f"slower load (an SVD per layer); not saved by ConvRot Save Quantized"),
                io.Combo.Input("group_size", options=GROUP_CHOICES, default="256",
                               tooltip="Rotation group size; 256 is the most accurate."),
                io.String.Input("overrides", multiline=True, default="", optional=True,
                                tooltip="Per-layer actions, one 'pattern = action' per line (action: bf16, w4a4, "
                                        "w8a8; glob patterns such as single_blocks.3*) or a JSON object."),
                io.Combo.Input("speed", options=SPEED_CHOICES, default="auto", optional=True,
                               tooltip="auto: on an NVIDIA GPU with room for the whole model, compile the FLUX "
                                       "blocks and replay steps as CUDA graphs (first step ~20 s slower, then "
                                       "faster); else, or with eager, ComfyUI's plain path. The log says which."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, preset="mixed", group_size="256", overrides="", speed="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return io.NodeOutput(load_convrot_model(path, preset, group_size, overrides or "", speed=speed))
