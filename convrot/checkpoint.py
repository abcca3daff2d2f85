"""The on-disk format (ComfyUI's native `convrot_w4a4` / ConvRot `int8_tensorwise`) and streaming file conversion.

Per quantized layer `<L>`:
  <L>.weight        int8  [out, in/2] (4 bit: rotated codes, low nibble = even input channel) or [out, in] (8 bit)
  <L>.weight_scale  fp32  [out]       absmax of the rotated row / qmax
  <L>.bias          unchanged
  <L>.comfy_quant   uint8 bytes of JSON {"format": "convrot_w4a4", "convrot_groupsize": G}
                    or {"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": G}
Files written elsewhere may instead carry the layer configs in the safetensors header as
`_quantization_metadata` = {"format_version": "1.0", "layers": {L: {...}}}; both forms are read.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from . import ops
from .hadamard import check_group_size
from .policy import BF16, W4A4, W8A8

FORMAT_W4A4 = "convrot_w4a4"
FORMAT_INT8 = "int8_tensorwise"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# a layer's keys besides weight/bias that quantizing it consumes (fp8 scales and configs fold into the new codes)
LAYER_SIDE_KEYS = ("weight_scale", "input_scale", "scale_weight", "scale_input", "comfy_quant")


def float_weight(get, has_float8_conf: bool = False) -> torch.Tensor:
    """A layer's weight as a float tensor, folding in the scale of the fp8 formats: ComfyUI's old `scale_weight`,
    or the `weight_scale` of an fp8 weight / a float8 comfy_quant layer. `get(sub)` returns the layer's tensor
    `sub` ("weight", "scale_weight", ...) or None."""
    w = get("weight")
    scale = get("scale_weight")
    if scale is None and (w.dtype in FP8_DTYPES or has_float8_conf):
        scale = get("weight_scale")
    if w.dtype in FP8_DTYPES or scale is not None:
        w = w.to(torch.float32)
        if scale is not None:
            w = w * scale.to(torch.float32)
    return w


def layer_getter(f, names, layer: str):
    """`get(sub)` for float_weight over an open file `f` (anything with get_tensor) holding tensors `names`."""
    return lambda sub: f.get_tensor(f"{layer}.{sub}") if f"{layer}.{sub}" in names else None


class CheckpointError(ValueError):
    """A file or layer that cannot be read or converted; the message names it."""


# ---------------------------------------------------------------- per-layer config

def layer_conf(action: str, group_size: int) -> dict:
    if action == W4A4:
        return {"format": FORMAT_W4A4, "convrot_groupsize": group_size}
    if action == W8A8:
        return {"format": FORMAT_INT8, "convrot": True, "convrot_groupsize": group_size}
    raise ValueError(f"no quantized format for action {action!r}")


def encode_conf(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def decode_conf(t: torch.Tensor, where: str) -> dict:
    try:
        conf = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: comfy_quant is not valid JSON ({e})") from e
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where}: comfy_quant must be a JSON object, got {type(conf).__name__}")
    return conf


def convrot_params(conf: dict, where: str) -> tuple[int, int] | None:
    """(bits, group_size) for a ConvRot layer config; None for the float8 formats we can dequantize on read.

    Any other format is refused by name: silently treating unknown bytes as weights would produce noise images.
    """
    fmt = conf.get("format")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    try:
        g = int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: unreadable convrot_groupsize in its comfy_quant ({e})") from e
    if fmt == FORMAT_W4A4:
        return 4, check_layer_group(g, where)
    if fmt == FORMAT_INT8 and conf.get("convrot", params.get("convrot", False)):
        return 8, check_layer_group(g, where)
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        return None
    raise CheckpointError(f"{where}: unsupported quantization format {fmt!r} (ConvRot reads convrot_w4a4, ConvRot "
                          f"int8_tensorwise and float8 layers; start from a bf16/fp16/fp8 file instead)")


def check_layer_group(g: int, where: str) -> int:
    try:
        return check_group_size(g)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def quantize_layer(weight: torch.Tensor, bias: torch.Tensor | None, action: str, group_size: int,
                   layer: str) -> dict[str, torch.Tensor]:
    """The state-dict entries (names relative to the layer) of one linear layer under `action`."""
    if action == BF16:
        out = {"weight": weight}
    else:
        bits = 4 if action == W4A4 else 8
        if weight.shape[1] % group_size:
            raise CheckpointError(f"{layer}: in_features {weight.shape[1]} is not a multiple of group size "
                                  f"{group_size}")
        q, s = ops.quantize_weight(weight, group_size, bits)
        out = {"weight": q, "weight_scale": s, "comfy_quant": encode_conf(layer_conf(action, group_size))}
    if bias is not None:
        out["bias"] = bias
    return out


# ---------------------------------------------------------------- safetensors header and streaming writer

@dataclass
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = -1  # absolute byte offset in the source file, where read from one


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor names, dtypes and shapes plus the metadata, validated against the file size (catches truncation)."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{name}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{name}: not a safetensors file, or truncated (header length {n} bytes, "
                                      f"file {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: cannot read the safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header")
    meta = header.pop("__metadata__", None) or {}
    infos, end = {}, 0
    for k, v in header.items():
        try:
            dt = _ST_DTYPES[v["dtype"]]
            b, e = int(v["data_offsets"][0]), int(v["data_offsets"][1])
            if any(int(d) < 0 for d in v["shape"]) or b < 0 or e < b:
                raise CheckpointError(f"{name}: tensor {k!r} has a negative size or offset: {v}")
            infos[k] = TensorInfo(dt, tuple(v["shape"]), 8 + n + b)
            if e - b != nbytes(infos[k]):
                raise CheckpointError(f"{name}: tensor {k!r} has {e - b} bytes for shape {v['shape']} {v['dtype']}")
            end = max(end, e)
        except (KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"{name}: tensor {k!r} has an unreadable or unsupported header entry {v}") from e
    if 8 + n + end > size:
        raise CheckpointError(f"{name}: truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return infos, meta


class TensorReader:
    """Reads one tensor at a time with plain file reads.

    No mmap: a mapped file's touched pages count as resident, so a streaming conversion would look (and on some
    systems act) as large as the whole model. Plain reads keep peak memory at one tensor.
    """

    def __init__(self, path: str, infos: dict[str, TensorInfo]):
        self.infos, self.f = infos, open(path, "rb")

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        n = nbytes(info)
        self.f.seek(info.start)
        buf = bytearray(self.f.read(n))
        if len(buf) != n:
            raise CheckpointError(f"{name}: file ended early ({len(buf)} of {n} bytes)")
        if n == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def nbytes(info: TensorInfo) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n * torch.empty((), dtype=info.dtype).element_size()


class StreamingWriter:
    """Writes a safetensors file one tensor at a time: the header is computed up front from the planned specs.

    Everything goes to `<path>.part`, renamed over `path` only after the last byte, so a crash or a bad layer
    never leaves a half-written model where a loader would pick it up.
    """

    def __init__(self, path: str, specs: dict[str, TensorInfo], metadata: dict[str, str] | None = None):
        self.path, self.tmp = path, path + ".part"
        self.order, self.specs, self.pos = list(specs), specs, 0
        header, off = {}, 0
        for k in self.order:
            n = nbytes(specs[k])
            header[k] = {"dtype": _ST_NAMES[specs[k].dtype], "shape": list(specs[k].shape), "data_offsets": [off, off + n]}
            off += n
        if metadata:
            header["__metadata__"] = {str(a): str(b) for a, b in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, t: torch.Tensor) -> None:
        want = self.specs[self.order[self.pos]]
        if name != self.order[self.pos] or tuple(t.shape) != want.shape or t.dtype != want.dtype:
            raise CheckpointError(f"internal: tensor {name} {t.dtype} {tuple(t.shape)} written out of plan "
                                  f"(expected {self.order[self.pos]} {want.dtype} {want.shape})")
        self.f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.pos += 1

    def close(self) -> None:
        if self.pos != len(self.order):
            self.abort()
            raise CheckpointError(f"internal: {len(self.order) - self.pos} tensors were never written")
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()
