"""Issue 13: bad files and failed writes give clear errors naming file and layer, leave nothing on disk, and a
corrupt input never becomes a clean-looking output (plus two small items of issue 17). CPU only."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from convrot.checkpoint import (
    MAX_CONF_BYTES, CheckpointError, StreamingWriter, TensorInfo, convrot_params, decode_conf, encode_conf,
    read_header)
from convrot.convert import header_layer_confs, inspect_file, plan_file, quantize_file
from convrot.flux import FluxConfig, random_flux
from convrot.policy import ECHO_CHARS, LayerPolicy, parse_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_sd():
    model = random_flux(FluxConfig.tiny(), seed=1)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def quantized_sd(tiny_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    save_file(tiny_sd, str(d / "src.safetensors"))
    quantize_file(str(d / "src.safetensors"), str(d / "q.safetensors"), 256, "mixed", device="cpu")
    with safe_open(str(d / "q.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write(tmp_path, sd, name="a.safetensors"):
    p = tmp_path / name
    save_file(sd, str(p))
    return p


def leftovers(folder, *keep):
    return sorted(set(os.listdir(folder)) - {os.path.basename(str(k)) for k in keep})


def raw_file(path, header, data=b""):
    """A safetensors file with exactly this header (a dict, or bytes as they are) and data bytes."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


# ---------------------------------------------------------------- 2, 3: writes

@pytest.mark.parametrize("limit", [4 << 10, 256 << 10])  # inside the buffered header; during the tensors
def test_disk_full_during_a_write_leaves_nothing(tmp_path, tiny_sd, limit):
    src = write(tmp_path, tiny_sd)
    dst = tmp_path / "q.safetensors"
    # a real write failure: the file-size limit makes write() fail with EFBIG past `limit`, and the buffered
    # bytes make close() fail again (what a full disk does)
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
              f"sys.path.insert(0, {REPO!r})\n"
              "from convrot.convert import quantize_file\n"
              "from convrot.checkpoint import CheckpointError\n"
              "try:\n"
              f"    quantize_file({str(src)!r}, {str(dst)!r}, 256, 'w4a4', device='cpu')\n"
              "except CheckpointError as e:\n"
              "    print('ERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERROR" in r.stdout and "nothing was written" in r.stdout, r.stdout + r.stderr
    assert leftovers(tmp_path, src) == []


def test_output_that_is_a_folder_is_refused_before_writing(tmp_path, tiny_sd):
    src = write(tmp_path, tiny_sd)
    dst = tmp_path / "out.safetensors"
    dst.mkdir()
    with pytest.raises(CheckpointError, match="out.safetensors.*folder"):
        quantize_file(str(src), str(dst), 256, device="cpu")
    assert leftovers(tmp_path, src, dst) == [] and os.listdir(dst) == []


def spec(n):
    return {"t": TensorInfo(torch.float32, (n,))}


def test_two_writers_to_one_output_do_not_mix(tmp_path):
    dst = tmp_path / "o.safetensors"
    a, b = StreamingWriter(str(dst), spec(4)), StreamingWriter(str(dst), spec(8))
    a.write("t", torch.full((4,), 1.0))
    b.write("t", torch.full((8,), 2.0))
    a.close()
    b.close()  # the last rename wins, whole
    with safe_open(str(dst), "pt") as f:
        assert torch.equal(f.get_tensor("t"), torch.full((8,), 2.0))
    assert leftovers(tmp_path, dst) == []


def test_symlink_at_the_temporary_name_is_not_followed(tmp_path):
    dst, victim = tmp_path / "o.safetensors", tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, str(dst) + ".part")
    with StreamingWriter(str(dst), spec(4)) as w:
        w.write("t", torch.zeros(4))
    assert victim.read_text() == "precious"
    assert read_header(str(dst))[0]["t"].shape == (4,)


def test_missing_output_folder_names_the_output(tmp_path, tiny_sd):  # issue 17.6
    src = write(tmp_path, tiny_sd)
    dst = tmp_path / "no" / "such" / "q.safetensors"
    with pytest.raises(CheckpointError) as e:
        quantize_file(str(src), str(dst), 256, device="cpu")
    assert str(dst) in str(e.value) and ".part" not in str(e.value)


# ---------------------------------------------------------------- 4, 5: malformed headers

TENSOR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "deep nesting": b'{"t": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "non-integer shape": {"t": {**TENSOR, "shape": ["2"]}},
    "float shape": {"t": {**TENSOR, "shape": [2.0]}},
    "4300-digit shape": ('{"t": {"dtype": "F32", "shape": [' + "9" * 4400 + '], "data_offsets": [0, 8]}}').encode(),
    "Infinity shape": b'{"t": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}',
    "huge zero-size shape": {"t": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}},
    "string offsets": {"t": {**TENSOR, "data_offsets": ["0", "8"]}},
    "metadata is a list": {"__metadata__": ["a"], "t": TENSOR},
    "metadata is a string": {"__metadata__": "abc", "t": TENSOR},
    "metadata value not a string": {"__metadata__": {"_quantization_metadata": {"layers": {}}}, "t": TENSOR},
    "entry is a list": {"t": [1, 2]},
    "bool shape": {"t": {**TENSOR, "shape": [True, 2]}},
    # what the official reader refuses
    "overlapping offsets": {"a": {**TENSOR, "data_offsets": [0, 8]}, "b": {**TENSOR, "data_offsets": [4, 12]}},
    "aliased offsets": {"a": TENSOR, "b": TENSOR},
    "duplicate keys": b'{"t": ' + json.dumps(TENSOR).encode() + b', "t": ' + json.dumps(TENSOR).encode() + b"}",
    "gap before a tensor": {"t": {**TENSOR, "data_offsets": [8, 16]}},
    "trailing bytes": {"t": TENSOR, "__trailing__": True},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_a_checkpoint_error_naming_the_file(tmp_path, case):
    header = MALFORMED[case]
    header = dict(header) if isinstance(header, dict) else header  # the table is shared with the next test
    data = b"\0" * 16
    if isinstance(header, dict) and header.pop("__trailing__", False):
        data = b"\0" * 8 + b"junk"
    elif isinstance(header, dict) and case in ("gap before a tensor", "overlapping offsets"):
        data = b"\0" * (16 if case == "gap before a tensor" else 12)
    elif case in ("non-integer shape", "float shape", "string offsets", "metadata is a list", "metadata is a string",
                  "metadata value not a string", "bool shape", "aliased offsets", "duplicate keys",
                  "4300-digit shape", "Infinity shape"):
        data = b"\0" * 8
    p = raw_file(tmp_path / "bad.safetensors", header if not isinstance(header, dict) else dict(header), data)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_header(str(p))


@pytest.mark.parametrize("case", ["overlapping offsets", "aliased offsets", "gap before a tensor", "trailing bytes"])
def test_the_official_reader_refuses_them_too(tmp_path, case):
    header = dict(MALFORMED[case])
    trailing = header.pop("__trailing__", False)
    data = {"overlapping offsets": 12, "gap before a tensor": 16}.get(case, 8)
    p = raw_file(tmp_path / "bad.safetensors", header, b"\0" * data + (b"junk" if trailing else b""))
    with pytest.raises(Exception):
        with safe_open(str(p), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_quantization_metadata_that_is_not_a_layer_table(tmp_path):
    for raw in ["[" * 100000, '{"layers": []}', '{"layers": "abc"}', "[1]", '{"layers": {"x": 3}}']:
        with pytest.raises(CheckpointError, match="f.safetensors"):
            header_layer_confs({"_quantization_metadata": raw}, "f.safetensors")
    with pytest.raises(CheckpointError, match="f.safetensors"):
        header_layer_confs({"_quantization_metadata": 5}, "f.safetensors")


def test_unknown_format_name_is_cut_in_the_error():
    with pytest.raises(CheckpointError) as e:
        convrot_params({"format": "f" * 300_000, "convrot_groupsize": 256}, "f: img_in")
    assert "img_in" in str(e.value) and len(str(e.value)) < ECHO_CHARS + 300


def test_comfy_quant_json_that_cannot_be_decoded():
    deep = torch.frombuffer(bytearray(b"[" * 50000), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="img_in"):
        decode_conf(deep, "f: img_in")
    for g in (1e400, float("nan"), "abc", [256]):
        with pytest.raises(CheckpointError, match="img_in.*convrot_groupsize"):
            convrot_params({"format": "convrot_w4a4", "convrot_groupsize": g}, "f: img_in")


def test_fuzzed_headers_give_checkpoint_errors_or_files_the_official_reader_takes(tmp_path):
    """Fixed seed, bounded count: what read_header accepts, safetensors accepts; everything else is a CheckpointError."""
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8)},
              str(good), metadata={"k": "v"})
    base = good.read_bytes()
    n = struct.unpack("<Q", base[:8])[0]
    rng = random.Random(13)
    accepted = 0
    for i in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 8 + n + 8)
            data[pos] = rng.choice([rng.randrange(256), ord("9"), ord("["), ord(","), ord('"'), ord("-")])
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data + b"\0" * rng.randint(1, 9)
        p = tmp_path / f"m{i}.safetensors"
        p.write_bytes(bytes(data))
        try:
            infos, _ = read_header(str(p))
        except CheckpointError as e:
            assert p.name in str(e)
            continue
        accepted += 1
        with safe_open(str(p), "pt") as f:  # must not raise
            for k in f.keys():
                assert tuple(f.get_tensor(k).shape) == infos[k].shape
    assert accepted < 300


# ---------------------------------------------------------------- 6, 7, 8: stored layers, fp8 scales, configs

LAYER = "double_blocks.0.img_mlp.0"  # W4A4 under `mixed`


@pytest.mark.parametrize("damage", ["nan scale", "zero scale", "short scale", "missing scale", "wrong weight"])
def test_damaged_quantized_layer_is_refused_everywhere(tmp_path, quantized_sd, damage):
    sd = dict(quantized_sd)
    s = sd[f"{LAYER}.weight_scale"].clone()
    if damage == "nan scale":
        s[3] = float("nan")
    elif damage == "zero scale":
        s[:] = 0
    elif damage == "short scale":
        s = s[:-1].clone()
    sd[f"{LAYER}.weight_scale"] = s
    if damage == "missing scale":
        del sd[f"{LAYER}.weight_scale"]
    if damage == "wrong weight":
        sd[f"{LAYER}.weight"] = sd[f"{LAYER}.weight"][:, :64].contiguous()
    src = write(tmp_path, sd)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=f"a.safetensors: {LAYER}"):
        plan_file(str(src), 256, "mixed")  # what the loader calls before ComfyUI reads a tensor
    with pytest.raises(CheckpointError, match=f"a.safetensors: {LAYER}"):
        quantize_file(str(src), str(dst), 256, "mixed", device="cpu")
    with pytest.raises(CheckpointError, match=f"a.safetensors: {LAYER}"):
        inspect_file(str(src))
    assert leftovers(tmp_path, src) == []


def test_fp8_per_row_scale_is_refused(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    k = "double_blocks.0.img_attn.proj"  # square: a bare [out] scale broadcasts along the inputs silently
    w = sd[f"{k}.weight"].float()
    row = w.abs().amax(1) / 448
    sd[f"{k}.weight"] = (w / row[:, None]).to(torch.float8_e4m3fn)
    sd[f"{k}.scale_weight"] = row
    src = write(tmp_path, sd)
    with pytest.raises(CheckpointError, match=f"{k}.*scale"):
        quantize_file(str(src), str(tmp_path / "o.safetensors"), 256, "w4a4", device="cpu")
    sd[f"{k}.scale_weight"] = row[:, None].contiguous()  # [out, 1] says per row unambiguously
    src = write(tmp_path, sd, "b.safetensors")
    quantize_file(str(src), str(tmp_path / "o.safetensors"), 256, "w4a4", device="cpu")


def test_huge_comfy_quant_is_refused_before_it_is_read(tmp_path, quantized_sd):
    sd = dict(quantized_sd)
    conf = {"format": "convrot_w4a4", "convrot_groupsize": 256, "pad": "x" * (4 * MAX_CONF_BYTES)}
    sd[f"{LAYER}.comfy_quant"] = encode_conf(conf)
    src = write(tmp_path, sd)
    with pytest.raises(CheckpointError, match=f"{LAYER}.*comfy_quant has \\d+ bytes"):
        plan_file(str(src), 256, "mixed")


# ---------------------------------------------------------------- 9: float shapes

@pytest.mark.parametrize("key,shape", [
    ("double_blocks.0.img_attn.qkv.bias", (1,)),
    ("final_layer.linear.bias", (1,)),
    ("double_blocks.1.txt_mlp.0.weight", (1024, 128)),
    ("double_blocks.1.img_attn.proj.weight", (256, 200)),  # a wrong in_features, not "not a multiple of G"
    ("single_blocks.0.norm.key_norm.scale", (64,)),
    ("double_blocks.0.img_mod.lin.bias", (1536, 1)),
])
def test_wrong_float_shape_is_a_size_mismatch_at_plan_time(tmp_path, tiny_sd, key, shape):
    sd = dict(tiny_sd)
    sd[key] = torch.zeros(shape, dtype=torch.bfloat16)
    src = write(tmp_path, sd)
    layer = key.rsplit(".", 1)[0]
    with pytest.raises(CheckpointError, match=f"a.safetensors: {layer}: size mismatch for {re.escape(key)}:"):
        plan_file(str(src), 256, "mixed")  # the wrong tensor is the one named (a bias, not its layer's weight)


def test_shape_check_accepts_prefixed_and_quantized_files(tmp_path, tiny_sd, quantized_sd):
    plan_file(str(write(tmp_path, {"model.diffusion_model." + k: v for k, v in tiny_sd.items()})), 256, "mixed")
    plan_file(str(write(tmp_path, quantized_sd, "q.safetensors")), 256, "mixed")
    sd = dict(quantized_sd)  # a quantized layer's bias is checked against its unpacked width too
    sd[f"{LAYER}.bias"] = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=f"{LAYER}: size mismatch"):
        plan_file(str(write(tmp_path, sd, "b.safetensors")), 256, "mixed")


# ---------------------------------------------------------------- 10: overrides

def test_override_that_matches_nothing_is_named(tmp_path, tiny_sd, caplog):
    src = write(tmp_path, tiny_sd)
    with caplog.at_level(logging.WARNING, logger="convrot"):
        plan_file(str(src), 256, "mixed", "double_block.* = bf16\nsingle_blocks.0.* = w8a8")
    warned = [r.getMessage() for r in caplog.records if "match no" in r.getMessage()]
    assert len(warned) == 1 and "double_block.*" in warned[0] and "single_blocks.0.*" not in warned[0]
    policy = LayerPolicy.for_names(tiny_sd, "mixed", "img_in = w8a8\nnope = bf16")
    assert policy.unmatched_overrides([k[:-7] for k in tiny_sd if k.endswith(".weight")]) == ["nope"]


def test_unparseable_override_line_is_cut_in_the_error():
    for line in ["x" * 1_000_000, "a = b " + "c" * 1_000_000, "=" * 200_000 + " a b"]:  # the last: quadratic for a regex
        t0 = time.time()
        with pytest.raises(ValueError) as e:
            parse_overrides(line)
        assert len(str(e.value)) < ECHO_CHARS + 150 and time.time() - t0 < 2
    with pytest.raises(ValueError) as e:
        LayerPolicy(overrides=[("p" * 100000, "bogus")])
    assert len(str(e.value)) < 2 * ECHO_CHARS + 150


# ---------------------------------------------------------------- 11: reference epilogue

def test_fp16_output_is_the_fp32_epilogue_cast_once():
    from convrot.reference import quantized_gemm, rotate_quantize
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(8, 512, generator=g) * 2 - 1) * 6e4).to(torch.float16)  # activations near fp16's limit
    w = torch.randn(64, 512, generator=g) / 512 ** 0.5 * 0.05
    wq, ws = rotate_quantize(w, 256)
    aq, as_ = rotate_quantize(x, 256)
    bias = torch.randn(64, generator=g).to(torch.float16)
    y16 = quantized_gemm(aq, as_, wq, ws, bias, torch.float16)
    y32 = quantized_gemm(aq, as_, wq, ws, bias, torch.float32)
    assert torch.equal(y16, y32.to(torch.float16))
    ref = torch.nn.functional.linear(x, w.half(), bias)
    assert torch.isfinite(ref).all() and torch.isfinite(y16).all()


def test_a_nan_token_gives_a_nan_row_on_the_reference_path_and_leaves_other_rows():
    """What reference.py documents for non-finite inputs (the CUDA kernels differ: fmaxf drops NaN)."""
    from convrot import ops
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g) / 16
    wq, ws = ops.quantize_weight(w, 256)
    x = torch.randn(4, 256, generator=g)
    x[1, 7] = float("nan")
    y = ops.linear(x, wq, ws, None, 256)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    clean = ops.linear(x[[0, 2, 3]], wq, ws, None, 256)
    torch.testing.assert_close(y[[0, 2, 3]], clean, rtol=1e-5, atol=1e-6)  # per-token: other rows unaffected


# ---------------------------------------------------------------- 12: quantize IN IN

def test_quantize_into_its_own_input_is_refused(tmp_path, tiny_sd):
    from convrot.cli import main
    src = write(tmp_path, tiny_sd)
    before = src.read_bytes()
    with pytest.raises(CheckpointError, match="input file itself"):
        quantize_file(str(src), str(src), 256, device="cpu")
    os.link(src, tmp_path / "hard.safetensors")
    assert main(["quantize", str(src), str(tmp_path / "hard.safetensors"), "--device", "cpu"]) == 2
    assert src.read_bytes() == before and leftovers(tmp_path, src, "hard.safetensors") == []
    assert main(["quantize", str(src), str(src), "--device", "cpu", "--overwrite"]) == 0
    assert "convrot" in read_header(str(src))[1]


# ---------------------------------------------------------------- 13 and issue 17: what the tools say

def test_save_node_says_where_it_writes():
    page = open(os.path.join(REPO, "web", "docs", "ConvRotSaveQuantized.md"), encoding="utf-8").read()
    node = open(os.path.join(REPO, "nodes", "save.py"), encoding="utf-8").read()
    assert "models/unet" in page and "first" in page
    desc = node.split("description=", 1)[1].split("inputs=", 1)[0]
    assert "models/unet" in desc
    # every other text that names where the saved file goes says the same
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    save_par = readme.split("**ConvRot Save Quantized**", 1)[1].split("\n\n", 1)[0]
    assert "models/unet/" in save_par
    texts = [readme] + [open(os.path.join(REPO, "workflows", f), encoding="utf-8").read()
                        for f in os.listdir(os.path.join(REPO, "workflows")) if f.endswith(".json")]
    for text in texts:
        assert "models/diffusion_models/convrot/" not in text
        assert "models/diffusion_models/{SAVED_FILE}" not in text
    notes = [t for t in texts[1:] if "flux_w4a4_00001_" in t]
    assert notes and all("models/unet/convrot/flux_w4a4_00001_" in t for t in notes)


def test_inspect_of_a_float_file_says_not_quantized(tmp_path, tiny_sd, capsys):
    from convrot.cli import main
    assert main(["inspect", str(write(tmp_path, tiny_sd))]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "not quantized" in last and "smaller" not in last
