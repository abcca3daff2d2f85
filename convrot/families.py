"""Which diffusion transformers ConvRot covers, how each is recognised from its tensor names, and which of its
linear layers each preset quantizes how. The one place for family rules: the layer policy, the file checks, the
loader and the Save node all ask here.

Names are seen without checkpoint prefix (policy.strip_prefix). Patterns are fnmatch globs (`*` also matches dots).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

BF16, W4A4, W8A8 = "bf16", "w4a4", "w8a8"


class UnsupportedModel(ValueError):
    """A file that is no diffusion transformer ConvRot covers; the message says what it looks like instead."""


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# A repeated transformer block: `<list>.<index>.<submodule>...`, the list named as DiTs name their block stacks
# (`blocks`, `transformer_blocks`, `double_stream_blocks`, `joint_blocks`, `layers`, `noise_refiner`, ...). The
# submodule part keeps top-level nn.Sequential embedders (`text_embedding.0`, `time_projection.1`) out, the name
# keeps lists of embedders (`caption_projection.0.linear`) out.
BLOCK_LIST = re.compile(r"(?:[A-Za-z_]\w*)?(?:blocks|layers|refiner)")
_BLOCK = re.compile(rf"({BLOCK_LIST.pattern})\.(\d+)\.\w.*")


def block_of(name: str) -> tuple[str, int] | None:
    """(block list, index) of a layer inside a repeated block, else None."""
    m = _BLOCK.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    image_models: tuple[str, ...]   # ComfyUI's unet_config["image_model"] values of this family
    # Always full precision: tiny, run once per step, and the most sensitive (embedders, output head).
    always_bf16: tuple[str, ...] = ()
    # The layers that turn the timestep into scales and shifts (AdaLN modulation, Chroma's approximator). They see
    # one token per image, so 4 bits save memory but no time, and their error reaches every block at once.
    sensitive: tuple[str, ...] = ()
    # What `compact` does to them: FLUX.1's per-block modulation goes to 4 bits (its documented trade); a layer
    # shared by every block (FLUX.2, Chroma, the generic rule's choice) stays at 8 bits.
    sensitive_compact: str = W8A8
    # Attention output projections: W8A8 under `mixed` (the ConvRot paper's FLUX recipe).
    attn_out: tuple[str, ...] = ()
    # Block linears by name; empty: the generic rule (any layer inside a repeated block, see block_of).
    blocks: tuple[str, ...] = ()
    # Whether `mixed` keeps the last block's MLP outputs in bf16 by name (FLUX's layout) rather than by shape.
    flux_layout: bool = False
    # Norm weights that ComfyUI's model config renamed from `.scale` on load (regexes on the ComfyUI key): the
    # Save node writes them back under the name a stock file has.
    scale_keys: tuple[str, ...] = ()

    def in_block(self, name: str) -> bool:
        return matches(name, self.blocks) if self.blocks else block_of(name) is not None

    def saved_name(self, key: str) -> str:
        if any(re.fullmatch(p, key) for p in self.scale_keys):
            return key[: -len(".weight")] + ".scale"
        return key


_FLUX_BLOCKS = ("double_blocks.*", "single_blocks.*")
_FLUX_ATTN_OUT = ("double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.proj")
_FLUX_SCALES = (r".*_norm\.weight",)  # supported_models.Flux: `*_norm.scale` -> `*_norm.weight`

FLUX1 = Family(
    "flux1", "FLUX.1", ("flux",),
    always_bf16=("img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.*"),
    sensitive=("double_blocks.*.img_mod.lin", "double_blocks.*.txt_mod.lin", "single_blocks.*.modulation.lin"),
    sensitive_compact=W4A4, attn_out=_FLUX_ATTN_OUT, blocks=_FLUX_BLOCKS, flux_layout=True, scale_keys=_FLUX_SCALES)

# FLUX.2 (dev 32B, klein 4B/9B): FLUX blocks with SwiGLU MLPs and no biases, modulated by three layers shared by
# all blocks instead of one per block.
FLUX2 = Family(
    "flux2", "FLUX.2", ("flux2",),
    always_bf16=("img_in", "txt_in", "time_in.*", "guidance_in.*", "final_layer.*"),
    sensitive=("double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"),
    attn_out=_FLUX_ATTN_OUT, blocks=_FLUX_BLOCKS, flux_layout=True, scale_keys=_FLUX_SCALES)

# Chroma: FLUX.1 blocks without modulation layers; a small MLP (the "approximator") computes every block's
# scales and shifts from the timestep at once.
CHROMA = Family(
    "chroma", "Chroma", ("chroma",),
    always_bf16=("img_in", "txt_in", "final_layer.*"),
    sensitive=("distilled_guidance_layer.*",),
    attn_out=_FLUX_ATTN_OUT, blocks=_FLUX_BLOCKS, flux_layout=True,
    # supported_models.Chroma renames every `.scale` (the q/k norms and the approximator's RMSNorms)
    scale_keys=_FLUX_SCALES + (r"distilled_guidance_layer\.norms\.\d+\.weight",))

# Any other DiT: layers inside repeated blocks are quantized, everything outside them (patch/text/time embedders,
# output heads, shared modulation such as Wan's time_projection) stays bf16, and inside blocks the modulation/AdaLN
# layers are found by name.
_GENERIC = dict(
    sensitive=("*mod*", "*adaLN*", "*.norm*.linear"),
    attn_out=("*attn*.o", "*attn*.proj", "*attn*.out_proj", "*attn*.o_proj", "*.to_out.0", "*.to_add_out"))
QWEN_IMAGE = Family("qwen_image", "Qwen-Image", ("qwen_image",), **_GENERIC)
WAN = Family("wan", "Wan 2.x", ("wan2.1",), **_GENERIC)
DIT = Family("dit", "diffusion transformer (generic rules)", (), **_GENERIC)

FAMILIES = {f.name: f for f in (FLUX1, FLUX2, CHROMA, QWEN_IMAGE, WAN, DIT)}
GENERIC = (QWEN_IMAGE, WAN, DIT)

# stripped names that identify a family; checked in order (FLUX.2 and Chroma carry FLUX.1's markers too)
FLUX_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
_MARKERS = (
    (CHROMA, ("distilled_guidance_layer.*",)),
    (FLUX2, ("double_stream_modulation_img.lin.weight",)),
    (QWEN_IMAGE, ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight")),
    (WAN, ("head.modulation",)),
)

# Variants of a named family that are not covered (checked before the family's markers).
_VARIANTS_NOT_COVERED = ((("nerf_blocks.*",), "Chroma Radiance (a pixel-space NeRF head), not covered yet"),)
# What files that are not diffusion transformers look like, to say so instead of "no layer to quantize". Checked
# only when no family matched: a full FLUX checkpoint carries text-encoder and VAE tensors too.
_NOT_COVERED = (
    (("input_blocks.*", "middle_block.*", "output_blocks.*", "down_blocks.*", "up_blocks.*", "mid_block.*"),
     "a UNet (SD1.x/SD2/SDXL-style convolutional model), not a diffusion transformer"),
    (("encoder.down.*", "decoder.up.*", "encoder.downsamples.*", "decoder.upsamples.*", "decoder.conv_in.*"),
     "a VAE, not a diffusion model"),
    (("embed_tokens.*", "layers.*.input_layernorm.*", "text_model.*", "encoder.block.*", "shared.weight",
      "token_embedding.*", "resblocks.*", "lm_head.*"), "a text encoder, not a diffusion model"),
)

SUPPORTED = "FLUX.1, FLUX.2 (dev, klein), Chroma, and diffusion transformers such as Qwen-Image and Wan 2.x"


def by_name(name: str) -> Family:
    return FAMILIES[name]


def by_image_model(image_model: str | None) -> Family | None:
    """The family of ComfyUI's `image_model`; None for a model ComfyUI knows but no family names (generic DiT)."""
    for f in FAMILIES.values():
        if image_model in f.image_models:
            return f
    return None


def detect(names, linear_layers=None) -> Family:
    """The family of a file from its (stripped) tensor names. `linear_layers`: its 2-D `.weight` layers, for the
    generic rule (without them, only the named families are recognised). Raises UnsupportedModel saying what the
    file looks like."""
    names = set(names)

    def refuse_if(table):
        for patterns, what in table:
            hit = next((n for n in sorted(names) if matches(n, patterns)), None)
            if hit is not None:
                raise UnsupportedModel(f"this is {what} (it has {hit})")

    refuse_if(_VARIANTS_NOT_COVERED)
    flux = all(m in names for m in FLUX_MARKERS)
    for fam, markers in _MARKERS:
        if all(any(fnmatch.fnmatchcase(n, m) for n in names) for m in markers):
            if fam.flux_layout and not flux:
                break  # a FLUX-family marker without FLUX blocks: judged as an incomplete FLUX file below
            return fam
    if flux:
        return FLUX1
    if any(m in names for m in FLUX_MARKERS):
        raise UnsupportedModel(f"this is a FLUX-style file without {' or '.join(m for m in FLUX_MARKERS if m not in names)}"
                               f" (incomplete, or a FLUX variant not covered)")
    refuse_if(_NOT_COVERED)
    if any(block_of(n) for n in (linear_layers or ())):
        return DIT
    raise UnsupportedModel("it has no transformer block linear layers (2-D weights under `blocks.N.`-style lists), "
                           "so there is nothing to quantize")


def sensitive_action(family: Family, preset: str) -> str:
    return {"w8a8": W8A8, "mixed": W8A8, "w4a4": BF16, "compact": family.sensitive_compact}[preset]


def last_outputs(family: Family, shapes: dict[str, tuple]) -> frozenset[str]:
    """The generic rule's layers that `mixed` keeps in bf16: in the last block of each block list, the layers
    that narrow their input (in > out features; in a transformer block, the MLP's down projection), whose error
    reaches the output head unfiltered. (FLUX layouts name theirs: policy.LayerPolicy.) `shapes`: layer -> weight
    shape."""
    last: dict[str, int] = {}
    for n in shapes:
        if (b := block_of(n)) is not None:
            last[b[0]] = max(last.get(b[0], -1), b[1])
    return frozenset(n for n, shape in shapes.items()
                     if (b := block_of(n)) is not None and b[1] == last[b[0]] and shape is not None
                     and len(shape) == 2 and shape[1] > shape[0] and not matches(n, family.sensitive))
