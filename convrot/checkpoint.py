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
import secrets
import struct
from dataclasses import dataclass

import torch

from . import ops
from .hadamard import check_group_size
from .policy import BF16, ECHO_CHARS, W4A4, W8A8, clip

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


def float_weight(get, has_float8_conf: bool = False, where: str = "") -> torch.Tensor:
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
            check_fp8_scale(tuple(scale.shape), tuple(w.shape), where or "fp8 layer")
            scale = scale.to(torch.float32)
            w = w * (scale.reshape(()) if scale.numel() == 1 else scale)
    return w


def check_fp8_scale(scale_shape: tuple, weight_shape: tuple, where: str) -> None:
    """fp8 weight scales are one number per tensor, or one per output row written as [out, 1].

    A bare [out] vector would broadcast along the *input* axis, which on a square layer multiplies without any
    error into a different matrix: refused, like every other shape.
    """
    n = 1
    for d in scale_shape:
        n *= d
    per_row = len(weight_shape) == 2 and tuple(scale_shape) == (weight_shape[0], 1)
    if n != 1 and not per_row:
        raise CheckpointError(f"{where}: fp8 weight scale of shape {list(scale_shape)} for a weight of shape "
                              f"{list(weight_shape)} (expected one value, or [out, 1])")


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


# A layer config is a few dozen bytes of JSON; anything far larger is a corrupt or hostile file, and decoding it
# costs memory (and JSON nesting costs recursion), so it is refused before it is read.
MAX_CONF_BYTES = 64 << 10


def encode_conf(conf: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def check_conf_size(numel: int, where: str) -> None:
    if numel > MAX_CONF_BYTES:
        raise CheckpointError(f"{where}: comfy_quant has {numel} bytes; a layer config is at most "
                              f"{MAX_CONF_BYTES} bytes of JSON")


def loads_json(raw, where: str, what: str):
    """json.loads whose every failure (bad syntax or UTF-8, nesting too deep, 4300-digit numbers) is a
    CheckpointError naming `where`."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{where}: {what} is not valid JSON ({type(e).__name__}: {str(e)[:ECHO_CHARS]})") from e


def decode_conf(t: torch.Tensor, where: str) -> dict:
    check_conf_size(t.numel(), where)
    if t.dtype not in (torch.uint8, torch.int8):
        raise CheckpointError(f"{where}: comfy_quant must hold uint8 bytes, not {t.dtype}")
    # bytes straight from the tensor's storage: tolist() would cost a Python int per byte
    conf = loads_json(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes(), where, "comfy_quant")
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
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{where}: unreadable convrot_groupsize in its comfy_quant ({e})") from e
    if fmt == FORMAT_W4A4:
        return 4, check_layer_group(g, where)
    if fmt == FORMAT_INT8 and conf.get("convrot", params.get("convrot", False)):
        return 8, check_layer_group(g, where)
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        return None
    raise CheckpointError(f"{where}: unsupported quantization format {clip(fmt)} (ConvRot reads convrot_w4a4, ConvRot "
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


# What the official safetensors reader enforces (safetensors/src/tensor.rs): a header of at most 100 MB holding a
# JSON object that starts with "{", string-to-string metadata, and tensors that tile the data buffer exactly
# (sorted by offset, each starting where the previous ended, the last ending at the end of the file). A file that
# breaks any of these is refused here too, so a corrupt input can never be rewritten into a clean-looking output.
MAX_HEADER_BYTES = 100 << 20
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_INT64_MAX = 2**63 - 1


def _no_duplicates(pairs):
    """object_pairs_hook for json.loads: safetensors refuses a header that names a key twice."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k[:ECHO_CHARS]!r}")
        d[k] = v
    return d


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _INT64_MAX


def _entry(name: str, k: str, v) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked for type and range."""
    where = f"{name}: tensor {k[:ECHO_CHARS]!r}"
    if not isinstance(v, dict) or set(v) != _ENTRY_KEYS:
        raise CheckpointError(f"{where}: a header entry must be an object with exactly {sorted(_ENTRY_KEYS)}, "
                              f"got {str(v)[:ECHO_CHARS]}")
    dt, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
    if not isinstance(dt, str) or dt not in _ST_DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {str(dt)[:40]!r} (readable: {sorted(_ST_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {str(shape)[:ECHO_CHARS]}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs) or offs[1] < offs[0]:
        raise CheckpointError(f"{where}: data_offsets must be two non-negative integers [begin, end] with "
                              f"begin <= end, got {str(offs)[:ECHO_CHARS]}")
    n = 1
    for d in shape:
        n *= max(d, 1)  # zero-size tensors too: torch cannot even describe a shape whose numel overflows int64
    if n > _INT64_MAX:
        raise CheckpointError(f"{where}: shape {shape} is too large to describe")
    return _ST_DTYPES[dt], tuple(shape), offs[0], offs[1]


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor names, dtypes and shapes plus the metadata, validated like the safetensors reader does (types,
    ranges, offsets tiling the data exactly: catches truncation, overlaps, gaps and trailing bytes)."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{name}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{name}: not a safetensors file, or truncated (header length {n} bytes, "
                                      f"file {size} bytes)")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read the safetensors header ({e})") from e
    if not text.startswith(b"{"):
        raise CheckpointError(f"{name}: not a safetensors file (its header is not a JSON object)")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: cannot read the safetensors header ({type(e).__name__}: "
                              f"{str(e)[:ECHO_CHARS]})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{name}: __metadata__ must map strings to strings, got {str(meta)[:ECHO_CHARS]}")
    infos, spans = {}, []
    for k, v in header.items():
        dt, shape, b, e = _entry(name, k, v)
        infos[k] = TensorInfo(dt, shape, 8 + n + b)
        if e - b != nbytes(infos[k]):
            raise CheckpointError(f"{name}: tensor {k[:ECHO_CHARS]!r} has {e - b} bytes for shape {list(shape)} "
                                  f"{v['dtype']}")
        spans.append((b, e, k))
    end = 0
    for b, e, k in sorted(spans):
        if b != end:
            what = "overlaps another tensor" if b < end else f"leaves a gap of {b - end} bytes before it"
            raise CheckpointError(f"{name}: tensor {k[:ECHO_CHARS]!r} {what} (data_offsets [{b}, {e}]); the file is "
                                  f"corrupt")
        end = e
    if 8 + n + end > size:
        raise CheckpointError(f"{name}: truncated: tensors need {8 + n + end} bytes, the file has {size}")
    if 8 + n + end < size:
        raise CheckpointError(f"{name}: {size - 8 - n - end} bytes after the last tensor; the file is corrupt")
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

    Everything goes to a temporary `<name>.<random>.part` in the output's folder, created exclusively (O_EXCL: never
    an existing file, never through a symlink, never shared by two writers), synced to disk and renamed over
    `path` only after the last byte, so a crash, a full disk or a bad layer never leaves a half-written model
    where a loader would pick it up, and a failure removes the temporary file on every path.
    """

    def __init__(self, path: str, specs: dict[str, TensorInfo], metadata: dict[str, str] | None = None):
        self.path, self.f, self.tmp = path, None, None
        self.order, self.specs, self.pos = list(specs), specs, 0
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise CheckpointError(f"{path}: cannot write: the folder {folder} does not exist")
        if os.path.isdir(path):
            raise CheckpointError(f"{path}: cannot write: it is an existing folder")
        header, off = {}, 0
        for k in self.order:
            n = nbytes(specs[k])
            header[k] = {"dtype": _ST_NAMES[specs[k].dtype], "shape": list(specs[k].shape), "data_offsets": [off, off + n]}
            off += n
        if metadata:
            header["__metadata__"] = {str(a): str(b) for a, b in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        try:
            self._open_tmp(folder)
            self.f.write(struct.pack("<Q", len(blob)) + blob)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"{path}: cannot write ({e.strerror or e}); nothing was written") from e

    def _open_tmp(self, folder: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        base = os.path.basename(self.path)
        for _ in range(100):  # a clash of 64 random bits means someone is creating names on purpose
            tmp = os.path.join(folder, f"{base}.{secrets.token_hex(8)}.part")
            try:
                fd = os.open(tmp, flags, 0o666)  # the usual umask-derived mode, as open(path, "wb") would give
            except FileExistsError:
                continue
            self.tmp = tmp
            self.f = os.fdopen(fd, "wb")
            return
        raise FileExistsError(f"no free temporary name next to {self.path}")

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
        try:
            self.f.flush()
            os.fsync(self.f.fileno())  # the rename must not reach the disk before the data it names
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"{self.path}: cannot write ({e.strerror or e}); nothing was written") from e
        self.tmp = None
        _sync_folder(os.path.dirname(self.path) or ".")

    def abort(self) -> None:
        """Remove the temporary file; never raises (it runs while another error is on its way up)."""
        if self.f is not None:
            try:
                self.f.close()  # flushing a full disk's buffer raises again: the file must still go
            except OSError:
                pass
        if self.tmp is not None:
            try:
                os.remove(self.tmp)
            except OSError:
                pass  # gone already, or nothing more can be done: the original error is the one to report
            self.tmp = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); best effort, where folders cannot be opened (Windows) a no-op."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
