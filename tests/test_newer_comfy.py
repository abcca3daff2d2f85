"""What keeps the pack right in ComfyUI releases newer than the v0.29 it is tested with (Comfy-Org/ComfyUI up to
v0.38, read through the search index): the Comfy Compiler switched off inside our step capture, and quantized
layers that ComfyUI's fused fast paths hand back to forward. On the CPU with ComfyUI v0.29: the mechanisms, not the
newer releases themselves."""
from __future__ import annotations

import pytest

from comfy_env import node_output, tiny_state_dict, write_file

NAME = "convrot_newer_tiny.safetensors"


def test_comfy_compiler_is_off_only_while_a_step_is_captured(comfy, monkeypatch):
    import comfy.cli_args as cli
    off = comfy.pack.nodes.graph.comfy_compiler_off
    args = cli.args
    monkeypatch.delattr(args, "disable_comfy_compiler", raising=False)
    with off():  # v0.29: no such switch
        assert not hasattr(args, "disable_comfy_compiler")
    monkeypatch.setattr(args, "disable_comfy_compiler", False, raising=False)
    with off():
        assert args.disable_comfy_compiler is True
    assert args.disable_comfy_compiler is False
    with pytest.raises(RuntimeError), off():
        raise RuntimeError("a failed capture")
    assert args.disable_comfy_compiler is False  # restored on every path
    monkeypatch.setattr(args, "disable_comfy_compiler", True)  # the user's --disable-comfy-compiler stays
    with off():
        pass
    assert args.disable_comfy_compiler is True


def test_quantized_layers_ask_for_forward_and_save_unchanged(comfy):
    write_file(comfy, NAME, tiny_state_dict(seed=11))
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotW4A4Loader"]
    model = node_output(loader.execute(NAME, "mixed", "256", ""))[0]
    layers = dict(comfy.pack.nodes.ops.quantized_layers(model.model.diffusion_model))
    assert {m.convrot_bits for m in layers.values()} == {4, 8}
    for name, m in layers.items():
        assert m._full_precision_mm is True, name
        assert not m._full_precision_mm_config, name
    dm = model.model.diffusion_model
    for name, m in dm.named_modules():
        if getattr(m, "convrot_bits", 0) is None and hasattr(m, "_full_precision_mm"):
            assert not m._full_precision_mm, name  # float layers keep ComfyUI's own choice
    sd = dm.state_dict()
    import json
    confs = [json.loads(bytes(v.tolist()).decode()) for k, v in sd.items() if k.endswith("comfy_quant")]
    assert confs and not any(c.get("full_precision_matrix_mult") for c in confs)
