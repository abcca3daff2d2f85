import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from convrot.checkpoint import CheckpointError, decode_conf, encode_conf, read_header
from convrot.convert import inspect_file, quantize_file
from convrot.flux import FluxConfig, example_inputs, random_flux
from convrot.linear import ConvRotLinear
from convrot.policy import LayerPolicy
from convrot.quantizer import quantize_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_flux_file(path, dtype=torch.bfloat16, prefix="", **cfg):
    model = random_flux(FluxConfig.tiny(**cfg), seed=1)
    sd = {prefix + k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return model


def load_quantized(model_cfg, path):
    """Build the tiny model and swap in ConvRotLinear layers from a native file."""
    model = random_flux(model_cfg, seed=99)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for name, mod in list(model.named_modules()):
            if f"{name}.comfy_quant" in keys:
                conf = decode_conf(f.get_tensor(f"{name}.comfy_quant"), name)
                bits = 4 if conf["format"] == "convrot_w4a4" else 8
                q = ConvRotLinear.from_quantized(f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight_scale"),
                                                 f.get_tensor(f"{name}.bias"), conf["convrot_groupsize"], bits)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, q)
            elif isinstance(mod, torch.nn.Linear):
                mod.weight.data.copy_(f.get_tensor(f"{name}.weight"))
                mod.bias.data.copy_(f.get_tensor(f"{name}.bias"))
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.data.copy_(f.get_tensor(name))
    return model


@pytest.mark.parametrize("preset", ["mixed", "w4a4", "compact", "w8a8"])
def test_file_conversion_matches_in_memory_quantization(tmp_path, preset):
    cfg = FluxConfig.tiny()
    src, dst = tmp_path / "flux.safetensors", tmp_path / "flux_q.safetensors"
    model = tiny_flux_file(src)
    plan = quantize_file(str(src), str(dst), 256, preset, device="cpu")
    assert plan.bytes_out < plan.bytes_in
    mem = random_flux(cfg, seed=1)
    quantize_model(mem, 256, LayerPolicy.for_names(model.state_dict(), preset))
    loaded = load_quantized(cfg, dst)
    x = example_inputs(cfg, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(**x), mem(**x))


def test_native_format_entries(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny_flux_file(src, prefix="model.diffusion_model.")
    quantize_file(str(src), str(dst), 64, "w4a4", device="cpu")
    with safe_open(str(dst), "pt") as f:
        p = "model.diffusion_model.double_blocks.0.img_attn.qkv"
        w, s = f.get_tensor(p + ".weight"), f.get_tensor(p + ".weight_scale")
        assert w.dtype == torch.int8 and w.shape == (768, 128)
        assert s.dtype == torch.float32 and s.shape == (768,)
        assert json.loads(bytes(f.get_tensor(p + ".comfy_quant").tolist())) == {
            "format": "convrot_w4a4", "convrot_groupsize": 64}
        assert f.get_tensor(p + ".bias").dtype == torch.bfloat16
        assert f.get_tensor("model.diffusion_model.img_in.weight").dtype == torch.bfloat16  # embedders stay
        assert "model.diffusion_model.double_blocks.0.img_mod.lin.comfy_quant" not in f.keys()  # w4a4: mod bf16
    report = inspect_file(str(dst))
    fmts = {r["layer"].split("diffusion_model.")[1]: r["format"] for r in report["layers"]}
    assert fmts["double_blocks.0.img_attn.qkv"] == "convrot_w4a4 (W4A4, G=64)"
    assert fmts["img_in"] == "bfloat16"


def test_quantized_file_passes_through_unchanged(tmp_path):
    src, q1, q2 = (tmp_path / n for n in ("a.safetensors", "b.safetensors", "c.safetensors"))
    tiny_flux_file(src)
    quantize_file(str(src), str(q1), 256, "mixed", device="cpu")
    plan = quantize_file(str(q1), str(q2), 256, "compact", device="cpu")  # kept layers are never requantized
    with safe_open(str(q1), "pt") as a, safe_open(str(q2), "pt") as b:
        k = "double_blocks.1.img_mlp.0.weight"
        assert torch.equal(a.get_tensor(k), b.get_tensor(k))
        assert plan.actions["double_blocks.1.img_mlp.0"] == "keep"


def test_header_form_quantization_metadata_is_read(tmp_path):
    src, q, hdr, out = (tmp_path / n for n in ("a.safetensors", "q.safetensors", "h.safetensors", "o.safetensors"))
    tiny_flux_file(src)
    quantize_file(str(src), str(q), 256, "w4a4", device="cpu")
    with safe_open(str(q), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".comfy_quant")}
        layers = {k[: -len(".comfy_quant")]: decode_conf(f.get_tensor(k), k) for k in f.keys()
                  if k.endswith(".comfy_quant")}
    save_file(sd, str(hdr), metadata={"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                              "layers": layers})})
    report = inspect_file(str(hdr))
    assert any("convrot_w4a4" in r["format"] for r in report["layers"])
    quantize_file(str(hdr), str(out), 256, "w4a4", device="cpu")
    with safe_open(str(out), "pt") as f:  # the header form becomes per-layer comfy_quant tensors
        assert decode_conf(f.get_tensor("single_blocks.0.linear1.comfy_quant"), "")["format"] == "convrot_w4a4"


def test_fp8_scaled_input(tmp_path):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "q.safetensors"
    model = random_flux(FluxConfig.tiny(), seed=1)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = v.float().abs().max() / 448
            sd[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            sd[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            sd[k] = v
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(src))
    quantize_file(str(src), str(dst), 256, "w4a4", device="cpu")
    with safe_open(str(dst), "pt") as f:
        k = "double_blocks.0.img_mlp.0"
        assert f.get_tensor(k + ".weight").dtype == torch.int8
        assert k + ".scale_weight" not in f.keys()
        assert f.get_tensor("img_in.scale_weight").numel() == 1  # unquantized fp8 layers keep their scale
        w = ConvRotLinear.from_quantized(f.get_tensor(k + ".weight"), f.get_tensor(k + ".weight_scale"), None, 256)
    ref = model.get_submodule(k).weight.float()
    assert (w.dequantize() - ref).norm() / ref.norm() < 0.2


# ---------------------------------------------------------------- bad input: clear errors, nothing written

def assert_nothing_written(dst):
    assert not os.path.exists(dst) and not os.path.exists(str(dst) + ".part")


def test_truncated_file(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny_flux_file(src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="a.safetensors.*truncated"):
        quantize_file(str(src), str(dst), 256, device="cpu")
    assert_nothing_written(dst)


def test_garbage_file(tmp_path):
    src = tmp_path / "junk.safetensors"
    src.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_header(str(src))


def test_not_flux(tmp_path):
    src, dst = tmp_path / "sdxl.safetensors", tmp_path / "b.safetensors"
    save_file({"input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}, str(src))
    with pytest.raises(CheckpointError, match="sdxl.safetensors: not a FLUX"):
        quantize_file(str(src), str(dst), 256, device="cpu")
    assert_nothing_written(dst)


def test_no_quantizable_layers(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny_flux_file(src)
    with pytest.raises(CheckpointError, match="no layer to quantize"):
        quantize_file(str(src), str(dst), 256, overrides="* = bf16", device="cpu")
    assert_nothing_written(dst)


def test_unsupported_group_size(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny_flux_file(src)
    with pytest.raises(ValueError, match="group size"):
        quantize_file(str(src), str(dst), 128, device="cpu")
    assert_nothing_written(dst)


def test_unknown_comfy_quant_format(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    model = random_flux(FluxConfig.tiny(), seed=1)
    sd = dict(model.state_dict())
    sd["double_blocks.0.img_mlp.0.comfy_quant"] = encode_conf({"format": "mystery_q3"})
    save_file(sd, str(src))
    with pytest.raises(CheckpointError, match="double_blocks.0.img_mlp.0.*mystery_q3"):
        quantize_file(str(src), str(dst), 256, device="cpu")
    assert_nothing_written(dst)


def test_layer_not_divisible_by_group_stays_unquantized(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny_flux_file(src, hidden=384)  # 384 = 1.5 x 256: block inputs of width 384 can't use G=256
    plan = quantize_file(str(src), str(dst), 256, "w4a4", device="cpu")
    assert plan.actions["double_blocks.0.img_attn.qkv"] == "bf16"
    assert plan.actions["double_blocks.0.img_mlp.2"] == "w4a4"  # K = 1536 = 6 x 256


# ---------------------------------------------------------------- CLI: streaming and peak memory

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "convrot", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_cli_quantize_streams_with_low_peak_memory(tmp_path):
    src, dst = tmp_path / "big.safetensors", tmp_path / "q.safetensors"
    tiny_flux_file(src, hidden=512, depth=8, single=16)  # many layers: the file dwarfs any one tensor
    size = src.stat().st_size
    assert size > 200e6
    # loading the whole file would need >= 1.0x its size; streaming needs a few copies of the largest tensor
    # plus allocator slack. Reset the high-water mark after the imports (Linux clear_refs "5"), so the peak is the conversion's own
    script = ("import sys, torch, convrot.convert\n"
              "def status(k):\n"
              "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(k))\n"
              "open('/proc/self/clear_refs', 'w').write('5')\n"
              "base = status('VmRSS:')\n"
              "from convrot.cli import main\n"
              "rc = main(sys.argv[1:])\n"
              "print('PEAK_KB', status('VmHWM:') - base)\n"
              "sys.exit(rc)\n")
    # glibc raises its mmap threshold after each large free, after which freed temporaries stay in the heap and
    # count as resident; a fixed threshold makes the high-water mark measure live memory, not allocator slack
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, "-c", script, "quantize", str(src), str(dst), "--preset", "w4a4",
                        "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split("PEAK_KB")[1].split()[0]) * 1024
    assert peak < 0.2 * size, f"peak {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    assert "smaller" in r.stdout and dst.stat().st_size < 0.5 * size
    i = run_cli("inspect", str(dst))
    assert i.returncode == 0 and "convrot_w4a4 (W4A4, G=256)" in i.stdout


def test_cli_reports_bad_input_without_traceback(tmp_path):
    src = tmp_path / "junk.safetensors"
    src.write_bytes(b"nonsense")
    r = run_cli("quantize", str(src), str(tmp_path / "o.safetensors"))
    assert r.returncode == 2 and "junk.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_demo_runs_and_reports():
    r = run_cli("demo", "--hidden", "256", "--depth", "1", "--single", "1")
    assert r.returncode == 0, r.stderr
    assert "final output relative error" in r.stdout and "smaller" in r.stdout
    err = float(r.stdout.split("final output relative error vs bf16:")[1].split()[0])
    assert 0 < err < 0.2


def test_unreadable_group_size_names_the_layer(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sd = dict(random_flux(FluxConfig.tiny(), seed=1).state_dict())
    sd["single_blocks.1.linear2.comfy_quant"] = encode_conf({"format": "convrot_w4a4", "convrot_groupsize": "abc"})
    save_file(sd, str(src))
    with pytest.raises(CheckpointError, match="single_blocks.1.linear2.*convrot_groupsize"):
        quantize_file(str(src), str(dst), 256, device="cpu")
    assert_nothing_written(dst)


def test_negative_shape_in_header_is_refused(tmp_path):
    import struct
    src = tmp_path / "neg.safetensors"
    header = json.dumps({"x.weight": {"dtype": "I8", "shape": [-1, -4], "data_offsets": [0, 4]}}).encode()
    src.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="neg.safetensors.*negative"):
        read_header(str(src))


def test_writer_that_misses_tensors_leaves_no_part_file(tmp_path):
    from convrot.checkpoint import StreamingWriter, TensorInfo
    dst = tmp_path / "o.safetensors"
    w = StreamingWriter(str(dst), {"a": TensorInfo(torch.float32, (2,)), "b": TensorInfo(torch.float32, (2,))})
    w.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match="never written"):
        w.close()
    assert_nothing_written(dst)


def test_override_actions_are_case_insensitive_in_every_form():
    from convrot.policy import parse_overrides
    want = [("double_blocks.*", "w8a8")]
    assert parse_overrides('{"double_blocks.*": "W8A8"}') == want
    assert parse_overrides("double_blocks.* = W8A8") == want
    assert parse_overrides({"double_blocks.*": "W8A8"}) == want


def _flux2_like_sd(h=256, m=768, wrong_mlp=False):
    """A FLUX.2-layout state dict (shared modulation, SwiGLU, no biases) of zeros: shapes are all that is checked."""
    z = lambda *s: torch.zeros(*s, dtype=torch.bfloat16)  # noqa: E731
    sd = {"img_in.weight": z(h, 128), "txt_in.weight": z(h, 512), "time_in.in_layer.weight": z(h, 256),
          "time_in.out_layer.weight": z(h, h), "double_stream_modulation_img.lin.weight": z(6 * h, h),
          "double_stream_modulation_txt.lin.weight": z(6 * h, h), "single_stream_modulation.lin.weight": z(3 * h, h),
          "final_layer.linear.weight": z(128, h), "final_layer.adaLN_modulation.1.weight": z(2 * h, h),
          "single_blocks.0.linear1.weight": z(3 * h + 2 * m, h), "single_blocks.0.linear2.weight": z(h, h + m),
          "single_blocks.0.norm.query_norm.scale": z(128), "single_blocks.0.norm.key_norm.scale": z(128)}
    for s in ("img", "txt"):
        p = f"double_blocks.0.{s}_"
        sd.update({p + "attn.qkv.weight": z(3 * h, h), p + "attn.proj.weight": z(h, h),
                   p + "mlp.0.weight": z(m if wrong_mlp and s == "img" else 2 * m, h), p + "mlp.2.weight": z(h, m),
                   p + "attn.norm.query_norm.scale": z(128), p + "attn.norm.key_norm.scale": z(128)})
    return sd


def test_flux2_file_plans_with_its_own_rules(tmp_path):
    """The engine alone (the CLI's path) recognises FLUX.2, checks its shapes and applies its preset rules."""
    from convrot.convert import plan_file
    src = tmp_path / "flux2.safetensors"
    save_file(_flux2_like_sd(), str(src))
    plan, _, _ = plan_file(str(src), 256, "mixed")
    assert plan.family == "flux2"
    assert plan.actions["double_stream_modulation_img.lin"] == "w8a8"
    assert plan.actions["double_blocks.0.img_mlp.0"] == "w4a4" and plan.actions["single_blocks.0.linear2"] == "bf16"
    assert plan_file(str(src), 256, "w4a4")[0].actions["single_stream_modulation.lin"] == "bf16"
    save_file(_flux2_like_sd(wrong_mlp=True), str(src))
    with pytest.raises(CheckpointError, match=r"flux2\.safetensors: double_blocks\.0\.img_mlp\.0: size mismatch.*"
                                              r"FLUX\.2 model"):
        plan_file(str(src), 256, "mixed")


@pytest.mark.parametrize("sd, what", [
    ({"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, "a UNet"),
    ({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 8)}, "a text encoder"),
    ({"nerf_blocks.0.norm.scale": torch.zeros(8), "distilled_guidance_layer.norms.0.scale": torch.zeros(8)},
     "Chroma Radiance"),
    ({"proj.weight": torch.zeros(8, 8)}, "no transformer block linear layers"),
])
def test_not_covered_files_are_named(tmp_path, sd, what):
    src, dst = tmp_path / "other.safetensors", tmp_path / "b.safetensors"
    save_file(sd, str(src))
    with pytest.raises(CheckpointError, match=rf"other\.safetensors: not a FLUX\.1 transformer or another model "
                                              rf"ConvRot covers: .*{what}"):
        quantize_file(str(src), str(dst), 256, device="cpu")
    assert_nothing_written(dst)
