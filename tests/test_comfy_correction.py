"""The loader's `PRESET+lr` presets: the calibration-free low-rank correction (convrot/correction.py) computed while
a float file loads, run as a branch beside each W4A4 GEMM, against a real ComfyUI on the CPU (skipped without one).
"""
from __future__ import annotations

import os

import pytest
import torch

from comfy_env import node_output, rel, sample, tiny_state_dict, write_file

NAME = "convrot_lr_tiny.safetensors"


@pytest.fixture(scope="module")
def models(comfy):
    sd = tiny_state_dict(seed=5)
    write_file(comfy, NAME, sd)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotW4A4Loader"]
    load = lambda preset: node_output(loader.execute(NAME, preset, "256", ""))[0]  # noqa: E731
    return dict(sd=sd, plain=load("mixed"), lr=load("mixed+lr"), compact_lr=load("compact+lr"),
                stock=comfy.nodes.UNETLoader().load_unet(NAME, "default")[0])


def test_the_branch_is_the_engines_on_every_w4a4_layer_only(comfy, models):
    pack = comfy.pack
    corr = pack.convrot.correction
    layers = dict(pack.nodes.ops.quantized_layers(models["lr"].model.diffusion_model))
    w4 = [n for n, m in layers.items() if m.convrot_bits == 4]
    assert w4 and any(m.convrot_bits == 8 for m in layers.values())
    for name, m in layers.items():
        if m.convrot_bits == 8:
            assert m.convrot_lr_down is None and m.convrot_lr_up is None, name
            continue
        cw = corr.quantize_with_correction(models["sd"][f"{name}.weight"], 256, 4, rank=corr.DEFAULT_RANK)
        assert torch.equal(m.weight._qdata, cw.codes) and torch.equal(m.weight_scale, cw.scale), name
        assert torch.equal(m.convrot_lr_down, cw.down.to(m.convrot_lr_down.dtype)), name
        assert torch.equal(m.convrot_lr_up, cw.up.to(m.convrot_lr_up.dtype)), name
        assert tuple(m.convrot_lr_down.shape) == (corr.DEFAULT_RANK, m.in_features)
        assert f"correction_rank={corr.DEFAULT_RANK}" in repr(m)
    # one layer's output: the quantized GEMM plus the branch, as the engine's CorrectedLinear computes it
    name = w4[0]
    m = layers[name]
    x = torch.randn(3, 7, m.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[..., 5] *= 20  # an outlier channel
    ref, _ = corr.corrected_convrot_linear(models["sd"][f"{name}.weight"],
                                           None if m.bias is None else m.bias.data, 256, 4, rank=corr.DEFAULT_RANK)
    torch.testing.assert_close(m(x), ref(x), rtol=2e-2, atol=2e-2)
    plain = dict(pack.nodes.ops.quantized_layers(models["plain"].model.diffusion_model))[name]
    assert plain.convrot_lr_down is None and not torch.equal(plain.weight._qdata, m.weight._qdata)


def test_loading_an_lr_preset_reports_no_missing_keys(comfy, models, caplog):
    """The branch is computed while loading: ComfyUI must not list it as missing from the file ("unet missing:
    [...convrot_lr_down...]" was a user-visible warning on every +lr load)."""
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotW4A4Loader"]
    with caplog.at_level("WARNING"):
        node_output(loader.execute(NAME, "compact+lr", "256", ""))
    missing = [r.getMessage()[:200] for r in caplog.records if "missing" in r.getMessage()]
    assert not missing, missing


def test_lr_presets_sample_closer_to_bf16(comfy, models):
    y_ref = sample(comfy, models["stock"])
    err = rel(sample(comfy, models["plain"]), y_ref)
    err_lr = rel(sample(comfy, models["lr"]), y_ref)
    err_compact_lr = rel(sample(comfy, models["compact_lr"]), y_ref)
    print(f"final latent vs bf16: mixed {err:.4f}, mixed+lr {err_lr:.4f}, compact+lr {err_compact_lr:.4f}")
    assert 0 < err_lr < err, (err_lr, err)
    assert 0 < err_compact_lr < 0.08, err_compact_lr


def test_save_refuses_a_corrected_model_and_writes_nothing(comfy, models):
    saver = comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotSaveQuantized"]
    with pytest.raises(ValueError, match="low-rank correction"):
        saver.execute(models["lr"], "convrot/never_lr")
    out_dir = comfy.folder_paths.get_folder_paths("diffusion_models")[0]
    written = [f for _, _, files in os.walk(out_dir) for f in files if "never_lr" in f]
    assert not written, written


def test_compiled_blocks_keep_the_branch(comfy, models):
    """Compile Blocks runs the corrected layers with the same samples as eager (the branch is plain torch ops)."""
    torch._dynamo.reset()
    compiled = comfy.pack.nodes.compile.compile_blocks(models["lr"], "eager")
    torch.testing.assert_close(sample(comfy, compiled, steps=1), sample(comfy, models["lr"], steps=1),
                               rtol=1e-4, atol=1e-4)


def test_unknown_lr_preset_is_named(comfy):
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotW4A4Loader"]
    with pytest.raises(Exception, match="unknown ConvRot preset 'w3a3\\+lr'"):
        loader.execute(NAME, "w3a3+lr", "256", "")


def test_a_model_saved_by_comfyuis_own_save_reloads_with_its_branch(comfy, models):
    """ComfyUI's checkpoint save writes the branch buffers next to the residual codes; the ConvRot loader reads them
    back (the codes alone would be a wrong model), and refuses a branch that does not fit its layer."""
    from comfy.sd import save_checkpoint
    from safetensors.torch import load_file, save_file
    out_dir = comfy.folder_paths.get_folder_paths("diffusion_models")[0]
    path = os.path.join(out_dir, "convrot_lr_saved_by_comfy.safetensors")
    save_checkpoint(path, models["lr"])
    sd = load_file(path)
    lr_keys = [k for k in sd if k.endswith(".convrot_lr_down")]
    assert lr_keys, "ComfyUI's save wrote no branch"
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotW4A4Loader"]
    again = node_output(loader.execute(os.path.basename(path), "mixed", "256", ""))[0]
    y_lr = sample(comfy, models["lr"])
    err_again = rel(sample(comfy, again), y_lr)
    stripped = os.path.join(out_dir, "convrot_lr_stripped.safetensors")  # the codes alone: what the branch is worth
    save_file({k: v for k, v in sd.items() if "convrot_lr_" not in k}, stripped)
    err_stripped = rel(sample(comfy, node_output(loader.execute(os.path.basename(stripped), "mixed", "256", ""))[0]),
                       y_lr)
    assert err_again < 2e-3 and err_again * 10 < err_stripped, (err_again, err_stripped)
    sd[lr_keys[0]] = sd[lr_keys[0]][:, :-8].contiguous()  # a branch of the wrong width
    bad = os.path.join(out_dir, "convrot_lr_bad.safetensors")
    save_file(sd, bad)
    with pytest.raises(Exception, match="low-rank correction"):
        loader.execute(os.path.basename(bad), "mixed", "256", "")
