"""File-level work: recognise a covered diffusion transformer, quantize a file tensor by tensor, report what a file
holds."""
from __future__ import annotations

import collections
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .checkpoint import (
    LAYER_SIDE_KEYS, CheckpointError, StreamingWriter, TensorInfo, TensorReader, check_conf_size, check_fp8_scale,
    convrot_params, decode_conf, encode_conf, float_weight, layer_conf, layer_getter, loads_json, nbytes,
    quantize_layer, read_header)
from . import families
from .policy import BF16, W4A4, LayerPolicy, clip, strip_prefix

log = logging.getLogger("convrot")


def detect_family(infos: dict[str, TensorInfo], file_name: str) -> families.Family:
    """The model family of a file (families.detect), or a CheckpointError naming the file and what it is."""
    stripped = {strip_prefix(k): i for k, i in infos.items()}
    try:
        return families.detect(stripped, [strip_prefix(k) for k in linear_layers(infos)])
    except families.UnsupportedModel as e:
        raise CheckpointError(f"{file_name}: not a FLUX.1 transformer or another model ConvRot covers: {e}. "
                              f"ConvRot covers {families.SUPPORTED}") from e


def header_layer_confs(meta: dict[str, str], file_name: str) -> dict[str, dict]:
    """Layer configs from the `_quantization_metadata` header form, keyed by layer name."""
    raw = meta.get("_quantization_metadata")
    if not raw:
        return {}
    where = f"{file_name}: _quantization_metadata header"
    if not isinstance(raw, str):
        raise CheckpointError(f"{where} must be a JSON string, got {type(raw).__name__}")
    doc = loads_json(raw, where, "it")
    layers = doc.get("layers", {}) if isinstance(doc, dict) else None
    if not isinstance(layers, dict):
        raise CheckpointError(f"{where}: expected an object with a \"layers\" object, got {clip(raw)}")
    for k, v in layers.items():
        if not isinstance(v, dict):
            raise CheckpointError(f"{file_name}: {clip(k)}: its config in the _quantization_metadata header must "
                                  f"be a JSON object, got {clip(json.dumps(v))}")
    return dict(layers)


def linear_layers(infos: dict[str, TensorInfo]) -> list[str]:
    """Layers whose `.weight` is a 2-D matrix: in FLUX these are exactly the linear layers (norms are 1-D)."""
    return [k[: -len(".weight")] for k, i in infos.items() if k.endswith(".weight") and len(i.shape) == 2]


@dataclass
class Plan:
    """What happens to each tensor of a source file, worked out from its header alone (nothing is read)."""
    specs: dict[str, TensorInfo] = field(default_factory=dict)  # output tensors, in write order
    actions: dict[str, str] = field(default_factory=dict)       # linear layer -> action ("keep" = already quantized)
    bytes_in: int = 0
    bytes_out: int = 0
    family: str = "flux1"                                       # families.FAMILIES key


# source keys of a layer that a requantized layer replaces (fp8 scales and configs are folded into the new codes)
_REPLACED = ("weight",) + LAYER_SIDE_KEYS


def layer_confs(f, infos, meta, file_name: str) -> dict[str, dict]:
    """Every layer's quantization config, from comfy_quant tensors or the header form (tensors win)."""
    confs = header_layer_confs(meta, file_name)
    for k, info in infos.items():
        if k.endswith(".comfy_quant"):
            layer = k[: -len(".comfy_quant")]
            check_conf_size(nbytes(info), f"{file_name}: {layer}")  # before reading: it may be gigabytes
            confs[layer] = decode_conf(f.get_tensor(k), f"{file_name}: {layer}")
    return confs


# ---------------------------------------------------------------- what a FLUX file's tensors must look like

# Every FLUX tensor's shape in the architecture's sizes: H hidden, M MLP hidden, D attention head, C image input
# channels (latent x patch), X text context, V pooled text vector, T timestep embedding, O final-layer outputs.
# A shape is checked like torch's load_state_dict does for stock ComfyUI ("size mismatch"): a wrong bias would
# otherwise broadcast into a wrong image, a wrong weight fail deep inside the sampler.
_DB = r"double_blocks\.\d+\.(?:img|txt)_"
_SB = r"single_blocks\.\d+\."
_EMBED = r"(?:time_in|guidance_in|vector_in)\."
FLUX_SHAPES = tuple((re.compile(p), shape) for p, shape in (
    (r"img_in\.weight", ("H", "C")), (r"img_in\.bias", ("H",)),
    (r"txt_in\.weight", ("H", "X")), (r"txt_in\.bias", ("H",)),
    (r"(?:time_in|guidance_in)\.in_layer\.weight", ("H", "T")), (r"vector_in\.in_layer\.weight", ("H", "V")),
    (_EMBED + r"out_layer\.weight", ("H", "H")), (_EMBED + r"(?:in|out)_layer\.bias", ("H",)),
    (_DB + r"mod\.lin\.weight", ("6H", "H")), (_DB + r"mod\.lin\.bias", ("6H",)),
    (_DB + r"attn\.qkv\.weight", ("3H", "H")), (_DB + r"attn\.qkv\.bias", ("3H",)),
    (rf"(?:{_DB}attn\.|{_SB})norm\.(?:query|key)_norm\.(?:scale|weight)", ("D",)),
    (_DB + r"attn\.proj\.weight", ("H", "H")), (_DB + r"attn\.proj\.bias", ("H",)),
    (_DB + r"mlp\.0\.weight", ("M", "H")), (_DB + r"mlp\.0\.bias", ("M",)),
    (_DB + r"mlp\.2\.weight", ("H", "M")), (_DB + r"mlp\.2\.bias", ("H",)),
    (_SB + r"linear1\.weight", ("3H+M", "H")), (_SB + r"linear1\.bias", ("3H+M",)),
    (_SB + r"linear2\.weight", ("H", "H+M")), (_SB + r"linear2\.bias", ("H",)),
    (_SB + r"modulation\.lin\.weight", ("3H", "H")), (_SB + r"modulation\.lin\.bias", ("3H",)),
    (r"final_layer\.linear\.weight", ("O", "H")), (r"final_layer\.linear\.bias", ("O",)),
    (r"final_layer\.adaLN_modulation\.1\.weight", ("2H", "H")), (r"final_layer\.adaLN_modulation\.1\.bias", ("2H",)),
))
# FLUX.2: SwiGLU MLPs (the first MLP layer is two matrices, gate and value, of M rows each), no biases, and three
# modulation layers shared by all blocks.
FLUX2_SHAPES = tuple((re.compile(p), shape) for p, shape in (
    (r"img_in\.weight", ("H", "C")), (r"txt_in\.weight", ("H", "X")),
    (r"(?:time_in|guidance_in)\.in_layer\.weight", ("H", "T")), (r"(?:time_in|guidance_in)\.out_layer\.weight", ("H", "H")),
    (r"double_stream_modulation_(?:img|txt)\.lin\.weight", ("6H", "H")),
    (r"single_stream_modulation\.lin\.weight", ("3H", "H")),
    (_DB + r"attn\.qkv\.weight", ("3H", "H")),
    (rf"(?:{_DB}attn\.|{_SB})norm\.(?:query|key)_norm\.(?:scale|weight)", ("D",)),
    (_DB + r"attn\.proj\.weight", ("H", "H")),
    (_DB + r"mlp\.0\.weight", ("2M", "H")), (_DB + r"mlp\.2\.weight", ("H", "M")),
    (_SB + r"linear1\.weight", ("3H+2M", "H")), (_SB + r"linear2\.weight", ("H", "H+M")),
    (r"final_layer\.linear\.weight", ("O", "H")), (r"final_layer\.adaLN_modulation\.1\.weight", ("2H", "H")),
))
# Chroma: FLUX.1's blocks (its table matches no modulation layer here) and the approximator: I inputs, A hidden,
# H outputs (one scale/shift vector per token of its 344-token modulation index).
_AP = r"distilled_guidance_layer\."
CHROMA_SHAPES = FLUX_SHAPES + tuple((re.compile(p), shape) for p, shape in (
    (_AP + r"in_proj\.weight", ("A", "I")), (_AP + r"in_proj\.bias", ("A",)),
    (_AP + r"layers\.\d+\.(?:in|out)_layer\.weight", ("A", "A")), (_AP + r"layers\.\d+\.(?:in|out)_layer\.bias", ("A",)),
    (_AP + r"norms\.\d+\.(?:scale|weight)", ("A",)),
    (_AP + r"out_proj\.weight", ("H", "A")), (_AP + r"out_proj\.bias", ("H",)),
))
FAMILY_SHAPES = {"flux1": FLUX_SHAPES, "flux2": FLUX2_SHAPES, "chroma": CHROMA_SHAPES}
_DIM_NAMES = (("H", "hidden"), ("D", "head dim"), ("M", "MLP"), ("C", "in channels"), ("X", "context"),
              ("V", "vector"), ("T", "time embedding"), ("O", "out channels"), ("A", "approximator hidden"),
              ("I", "approximator in"))


def _size(expr: str, dims: dict[str, int]) -> int | None:
    """An entry of FLUX_SHAPES ("3H+M") in numbers; None when one of its sizes is unknown."""
    total = 0
    for coef, sym in re.findall(r"(\d*)([A-Z])", expr):
        if sym not in dims:
            return None
        total += int(coef or 1) * dims[sym]
    return total


def logical_shapes(infos: dict[str, TensorInfo], confs: dict[str, dict], file_name: str) -> dict[str, tuple]:
    """Each tensor's shape as the model sees it: a quantized layer's packed int4 weight counts two inputs a byte."""
    shapes = {k: i.shape for k, i in infos.items()}
    for layer, conf in confs.items():
        params = convrot_params(conf, f"{file_name}: {layer}")
        w = shapes.get(f"{layer}.weight")
        if params and params[0] == 4 and w is not None and len(w) == 2:
            shapes[f"{layer}.weight"] = (w[0], w[1] * 2)
    return shapes


def flux_dims(shapes: dict[str, tuple], table=FLUX_SHAPES) -> dict[str, int]:
    """The architecture's sizes, each the value most tensors agree on (so one bad tensor is the one named, not
    every tensor that disagrees with it). A weight's vote counts twice a bias's: where a size has only those two
    voters (the final layer's output channels), a wrong bias is the tensor named."""
    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for k, shape in shapes.items():
        for pat, want in table:
            if pat.fullmatch(strip_prefix(k)):
                if len(shape) == len(want):
                    for sym, d in zip(want, shape):
                        if len(sym) == 1:
                            votes[sym][d] += 2 if k.endswith(".weight") else 1
                break
    return {sym: c.most_common(1)[0][0] for sym, c in votes.items()}


def check_flux_shapes(shapes: dict[str, tuple], file_name: str, family: str = "flux1") -> dict[str, int]:
    """Refuse any FLUX-family tensor whose shape the architecture (derived from the file itself) does not imply."""
    table = FAMILY_SHAPES[family]
    dims = flux_dims(shapes, table)
    arch = ", ".join(f"{label} {dims[s]}" for s, label in _DIM_NAMES if s in dims)
    if "H" in dims and "D" in dims and (dims["D"] == 0 or dims["H"] % dims["D"]):
        raise CheckpointError(f"{file_name}: size mismatch: hidden size {dims['H']} is not a whole number of "
                              f"attention heads of {dims['D']} (the q/k norm size); the file is corrupt")
    for k, shape in shapes.items():
        for pat, want in table:
            if pat.fullmatch(strip_prefix(k)):
                expect = tuple(_size(e, dims) for e in want)
                if tuple(shape) != expect:
                    layer = k.rsplit(".", 1)[0]
                    raise CheckpointError(
                        f"{file_name}: {layer}: size mismatch for {k}: shape {list(shape)} in the file, "
                        f"{[e if e is not None else '?' for e in expect]} in this "
                        f"{families.by_name(family).label} model ({arch})")
                break
    return dims


def check_quantized_layers(f, infos: dict[str, TensorInfo], confs: dict[str, dict], file_name: str) -> None:
    """Layers stored quantized are used as they are, so their tensors are checked here: int8 codes of a sensible
    shape and one finite, positive fp32 scale per output row (a NaN, zero or missing scale gives NaN or zero
    outputs, with no error anywhere). fp8 scales are checked for shape (see check_fp8_scale)."""
    for layer, conf in confs.items():
        where = f"{file_name}: {layer}"
        params = convrot_params(conf, where)
        w = infos.get(f"{layer}.weight")
        if w is None:
            if f"{layer}.comfy_quant" in infos:
                raise CheckpointError(f"{where}: has a comfy_quant config but no weight tensor")
            continue  # a header-form entry for a layer this file does not hold: ComfyUI ignores it too
        if params is None:
            for sub in ("weight_scale", "scale_weight"):
                if f"{layer}.{sub}" in infos:
                    check_fp8_scale(infos[f"{layer}.{sub}"].shape, w.shape, where)
            continue
        bits, g = params
        if w.dtype != torch.int8 or len(w.shape) != 2:
            raise CheckpointError(f"{where}: a W{bits}A{bits} layer needs an int8 [out, in{'/2' if bits == 4 else ''}]"
                                  f" weight, the file has {str(w.dtype).replace('torch.', '')} {list(w.shape)}")
        out_f, in_f = w.shape[0], w.shape[1] * (2 if bits == 4 else 1)
        if out_f == 0 or in_f == 0 or in_f % g:
            raise CheckpointError(f"{where}: weight {list(w.shape)} does not hold whole groups of {g} inputs "
                                  f"({in_f} inputs)")
        s = infos.get(f"{layer}.weight_scale")
        if s is None:
            raise CheckpointError(f"{where}: quantized weight without its weight_scale")
        if not s.dtype.is_floating_point or s.shape not in ((out_f,), (out_f, 1)):
            raise CheckpointError(f"{where}: weight_scale must be float [{out_f}] (one per output row), the file "
                                  f"has {str(s.dtype).replace('torch.', '')} {list(s.shape)}")
        scale = f.get_tensor(f"{layer}.weight_scale").to(torch.float32)
        bad = int((~torch.isfinite(scale) | (scale <= 0)).sum())
        if bad:
            raise CheckpointError(f"{where}: weight_scale has {bad} of {out_f} values that are NaN, infinite, zero "
                                  f"or negative; the file is corrupt")
    for k, info in infos.items():  # the old scaled-fp8 form carries no config
        if k.endswith(".scale_weight"):
            layer = k[: -len(".scale_weight")]
            w = infos.get(f"{layer}.weight")
            check_fp8_scale(info.shape, w.shape if w is not None else (), f"{file_name}: {layer}")


def check_file(f, infos: dict[str, TensorInfo], confs: dict[str, dict], file_name: str, flux: bool = True,
               family: str = "flux1") -> None:
    """Everything a file's header and its small tensors can tell about its validity, before any weight is read
    (with `flux`, the shape rules of a FLUX-family `family` too; other families have no table here, and ComfyUI's
    load_state_dict refuses their size mismatches)."""
    check_quantized_layers(f, infos, confs, file_name)
    if flux and family in FAMILY_SHAPES:
        check_flux_shapes(logical_shapes(infos, confs, file_name), file_name, family)


def plan_file(path: str, group_size: int, preset: str, overrides=None) -> tuple[Plan, dict, dict]:
    """Decide every layer's fate from the header (and the tiny comfy_quant and scale tensors) before touching
    weights; every tensor's shape and every stored quantized layer is checked on the way."""
    name = os.path.basename(path)
    infos, meta = read_header(path)
    family = detect_family(infos, name)
    with TensorReader(path, infos) as f:
        confs = layer_confs(f, infos, meta, name)
        check_file(f, infos, confs, name, family=family.name)
    return plan_tensors(infos, confs, name, group_size, preset, overrides, family.name), infos, meta


def plan_tensors(infos: dict[str, TensorInfo], confs: dict[str, dict], name: str, group_size: int, preset: str,
                 overrides=None, family: str = "flux1") -> Plan:
    """plan_file's decisions for tensors described by `infos` (a file's header, or a model's shapes: the preset
    memory table uses it); `name` is what messages call them."""
    policy = LayerPolicy.for_names(logical_shapes(infos, confs, name), preset, overrides, family)
    unmatched = policy.unmatched_overrides(linear_layers(infos))
    if unmatched:
        log.warning("ConvRot: %s: these override patterns match no linear layer and change nothing: %s",
                    name, ", ".join(clip(p, 80) for p in unmatched))
    plan = Plan()
    for layer in sorted(linear_layers(infos)):
        conf = confs.get(layer)
        if conf is not None and convrot_params(conf, f"{name}: {layer}") is not None:
            plan.actions[layer] = "keep"  # already ConvRot: never requantize (it would compound the error)
            continue
        act = policy.action(layer)
        in_f = infos[f"{layer}.weight"].shape[1]
        if act != BF16 and in_f % group_size:
            log.info("ConvRot: %s stays unquantized: in_features %d is not a multiple of group size %d",
                     layer, in_f, group_size)
            act = BF16
        plan.actions[layer] = act
    if not any(a != BF16 for a in plan.actions.values()):
        raise CheckpointError(f"{name}: no layer to quantize with preset {preset!r} and group size {group_size} "
                              f"(every linear layer would stay unquantized)")
    for k, info in infos.items():
        plan.bytes_in += nbytes(info)
        layer, sub = k.rsplit(".", 1) if "." in k else (k, "")
        act = plan.actions.get(layer)
        if act in (None, "keep", BF16):
            plan.specs[k] = info
        elif sub == "weight":
            out_f, in_f = info.shape
            plan.specs[k] = TensorInfo(torch.int8, (out_f, in_f // 2 if act == W4A4 else in_f))
            plan.specs[f"{layer}.weight_scale"] = TensorInfo(torch.float32, (out_f,))
            plan.specs[f"{layer}.comfy_quant"] = TensorInfo(torch.uint8, (len(encode_conf(layer_conf(act, group_size))),))
        elif sub not in _REPLACED:
            plan.specs[k] = info
    for layer, conf in confs.items():  # header-form configs of kept layers become comfy_quant tensors
        key = f"{layer}.comfy_quant"
        if key not in plan.specs and plan.actions.get(layer) in ("keep", BF16):
            plan.specs[key] = TensorInfo(torch.uint8, (len(encode_conf(conf)),))
    plan.bytes_out = sum(nbytes(i) for i in plan.specs.values())
    plan.family = family
    return plan


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # b does not exist yet (or cannot be examined): it cannot be a
        return False


def quantize_file(src: str, dst: str, group_size: int = 256, preset: str = "mixed", overrides=None,
                  device: str | None = None, progress: Callable[[int, int, str], None] | None = None,
                  overwrite: bool = False) -> Plan:
    """Quantize a diffusion transformer safetensors file into the native ConvRot format, holding one layer in memory
    at a time.

    Writing over the input itself is refused unless `overwrite`: the result replaces the original only once it
    is complete, but the original is gone then."""
    name = os.path.basename(src)
    if not overwrite and same_file(src, dst):
        raise CheckpointError(f"{dst}: is the input file itself; write to another file (or pass --overwrite to "
                              f"replace the input once the new file is complete)")
    plan, infos, meta = plan_file(src, group_size, preset, overrides)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_meta = {k: v for k, v in meta.items() if k != "_quantization_metadata"}
    out_meta["convrot"] = json.dumps({"group_size": group_size, "preset": preset})
    total = sum(1 for a in plan.actions.values() if a not in (BF16, "keep"))
    done = 0
    try:
        with TensorReader(src, infos) as f, StreamingWriter(dst, plan.specs, out_meta) as w:
            confs = layer_confs(f, infos, meta, name)
            for k in plan.specs:
                layer, sub = k.rsplit(".", 1) if "." in k else (k, "")
                act = plan.actions.get(layer)
                if act in (None, "keep", BF16) or sub not in _REPLACED:
                    # a comfy_quant entry may have lived only in the header form
                    w.write(k, f.get_tensor(k) if k in infos else encode_conf(confs[layer]))
                    continue
                if not k.endswith(".weight"):
                    continue  # written together with the weight below
                weight = float_weight(layer_getter(f, infos, layer), layer in confs, f"{name}: {layer}").to(device)
                entries = quantize_layer(weight, None, act, group_size, f"{name}: {layer}")
                for sub in ("weight", "weight_scale", "comfy_quant"):
                    w.write(f"{layer}.{sub}", entries[sub])
                done += 1
                if progress:
                    progress(done, total, layer)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{name}: conversion failed ({type(e).__name__}: {e}); nothing was written") from e
    return plan


def inspect_file(path: str) -> dict:
    """Per-layer format and byte counts of a safetensors file, without reading tensor data."""
    name = os.path.basename(path)
    infos, meta = read_header(path)
    rows = []
    with TensorReader(path, infos) as f:
        confs = layer_confs(f, infos, meta, name)
        try:
            family = detect_family(infos, name).name
        except CheckpointError:
            family = None  # other files are listed too, without any family's shape rules
        check_file(f, infos, confs, name, flux=family is not None, family=family)
        for layer in sorted(linear_layers(infos)):
            w = infos[f"{layer}.weight"]
            conf = confs.get(layer)
            params = convrot_params(conf, f"{name}: {layer}") if conf else None
            fmt = conf.get("format") if conf else str(w.dtype).replace("torch.", "")
            if params:
                bits, g = params
                in_f = w.shape[1] * (2 if bits == 4 else 1)
                fmt = f"{fmt} (W{bits}A{bits}, G={g})"
            else:
                in_f = w.shape[1]
            stored = sum(nbytes(infos[k]) for k in infos if k.rsplit(".", 1)[0] == layer)
            rows.append({"layer": layer, "format": fmt, "shape": [w.shape[0], in_f], "bytes": stored,
                         "bf16_bytes": w.shape[0] * in_f * 2})
    total = sum(nbytes(i) for i in infos.values())
    return {"file": name, "layers": rows, "total_bytes": total, "metadata": {k: v for k, v in meta.items()}}
