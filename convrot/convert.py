"""File-level work: recognise a FLUX transformer, quantize a file tensor by tensor, report what a file holds."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .checkpoint import (
    LAYER_SIDE_KEYS, CheckpointError, StreamingWriter, TensorInfo, TensorReader, convrot_params, decode_conf,
    encode_conf, float_weight, layer_conf, layer_getter, nbytes,
    quantize_layer, read_header)
from .policy import BF16, W4A4, LayerPolicy, strip_prefix

log = logging.getLogger("convrot")

FLUX_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")


def check_flux(names, file_name: str) -> None:
    stripped = {strip_prefix(n) for n in names}
    missing = [m for m in FLUX_MARKERS if m not in stripped]
    if missing:
        raise CheckpointError(f"{file_name}: not a FLUX.1 transformer (missing {', '.join(missing)}); ConvRot W4A4 "
                              f"supports FLUX.1 dev/schnell/Kontext-style models")


def header_layer_confs(meta: dict[str, str], file_name: str) -> dict[str, dict]:
    """Layer configs from the `_quantization_metadata` header form, keyed by layer name."""
    raw = meta.get("_quantization_metadata")
    if not raw:
        return {}
    try:
        layers = json.loads(raw).get("layers", {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{file_name}: unreadable _quantization_metadata header ({e})") from e
    return {k: v for k, v in layers.items() if isinstance(v, dict)}


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


# source keys of a layer that a requantized layer replaces (fp8 scales and configs are folded into the new codes)
_REPLACED = ("weight",) + LAYER_SIDE_KEYS


def layer_confs(f, infos, meta, file_name: str) -> dict[str, dict]:
    """Every layer's quantization config, from comfy_quant tensors or the header form (tensors win)."""
    confs = header_layer_confs(meta, file_name)
    for k in infos:
        if k.endswith(".comfy_quant"):
            layer = k[: -len(".comfy_quant")]
            confs[layer] = decode_conf(f.get_tensor(k), f"{file_name}: {layer}")
    return confs


def plan_file(path: str, group_size: int, preset: str, overrides=None) -> tuple[Plan, dict, dict]:
    """Decide every layer's fate from the header (and the tiny comfy_quant tensors) before touching weights."""
    name = path.rsplit("/", 1)[-1]
    infos, meta = read_header(path)
    check_flux(infos, name)
    with TensorReader(path, infos) as f:
        confs = layer_confs(f, infos, meta, name)
    policy = LayerPolicy.for_names(infos, preset, overrides)
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
    return plan, infos, meta


def quantize_file(src: str, dst: str, group_size: int = 256, preset: str = "mixed", overrides=None,
                  device: str | None = None, progress: Callable[[int, int, str], None] | None = None) -> Plan:
    """Quantize a FLUX safetensors file into the native ConvRot format, holding one layer in memory at a time."""
    name = src.rsplit("/", 1)[-1]
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
                weight = float_weight(layer_getter(f, infos, layer), layer in confs).to(device)
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
    name = path.rsplit("/", 1)[-1]
    infos, meta = read_header(path)
    rows = []
    with TensorReader(path, infos) as f:
        confs = layer_confs(f, infos, meta, name)
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
