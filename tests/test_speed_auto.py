"""The loader's `speed = auto` decision (nodes/loader.py fast_path_unavailable): compile and capture only when the
whole model stays resident, counted the way ComfyUI counts its own free memory. ComfyUI on the CPU, with a stand-in
GPU patcher: the decision reads only sizes, the device type and the toolchain."""
from __future__ import annotations

import sys
import types

import pytest
import torch

GB = 2**30


@pytest.fixture
def decide(comfy, monkeypatch):
    loader = comfy.pack.nodes.loader
    monkeypatch.setattr(comfy.pack.nodes.compile, "block_keys", lambda patcher: ["double_blocks"])
    monkeypatch.setattr(loader.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("CONVROT_SPEED", raising=False)
    try:
        import triton  # noqa: F401
    except ImportError:  # the decision only asks whether it imports
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    mm = comfy.mm

    def run(free_gb: float, reserved_gb: float, model_gb: float = 8.0, loaded_gb: float = 0.0,
            vram_state=mm.VRAMState.NORMAL_VRAM):
        monkeypatch.setattr(mm, "vram_state", vram_state)
        monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: free_gb * GB)
        monkeypatch.setattr(mm, "extra_reserved_memory", lambda: reserved_gb * GB)
        patcher = types.SimpleNamespace(load_device=torch.device("cuda", 0), model_size=lambda: model_gb * GB,
                                        loaded_size=lambda: loaded_gb * GB)
        return loader.fast_path_unavailable(patcher)
    return run


def test_a_model_that_fits_is_compiled(decide):
    assert decide(free_gb=130, reserved_gb=0.4) is None


def test_reserved_vram_counts_against_the_fit(decide):
    """--reserve-vram 133.4 on a 140 GB card: ComfyUI streams an 8 GB model, so steps must not be captured (S15 ran
    this case with compiled blocks: the rule did not count the reserve)."""
    why = decide(free_gb=139, reserved_gb=133.4)
    assert why is not None and "reserved" in why and "eagerly" in why


def test_weights_already_loaded_count_as_free(decide):
    assert decide(free_gb=7, reserved_gb=0.4, loaded_gb=8) is None
    assert decide(free_gb=7, reserved_gb=0.4, loaded_gb=0) is not None


def test_novram_runs_eagerly_even_with_room(decide, comfy):
    """--novram streams every weight from CPU memory whatever is free: compiled there, mixed ran at 3.11 it/s where
    the same kernels uncompiled (stock loader, native file) ran at 3.93 (S19, H200)."""
    states = comfy.mm.VRAMState
    why = decide(free_gb=130, reserved_gb=0.4, vram_state=states.NO_VRAM)
    assert why is not None and "--novram" in why and "eagerly" in why
    assert decide(free_gb=130, reserved_gb=0.4, vram_state=states.LOW_VRAM) is None  # the model fits: captured
    assert decide(free_gb=130, reserved_gb=0.4, vram_state=states.HIGH_VRAM) is None


@pytest.mark.parametrize("route, says", [("triton", "Triton route's kernels start from Python"),
                                         ("cuda", "steps replayed as CUDA graphs")])
def test_the_log_line_says_what_the_route_allows(comfy, monkeypatch, caplog, route, says):
    """Under cudaMallocAsync the Triton route's steps are not captured (S21 log: the graph node ran eagerly), so
    the loader's line must not promise CUDA graphs there."""
    import logging
    loader = comfy.pack.nodes.loader
    pack = comfy.pack
    monkeypatch.setattr(loader, "fast_path_unavailable", lambda patcher: None)
    monkeypatch.setattr(pack.nodes.compile, "compile_blocks", lambda patcher, **kw: patcher)
    monkeypatch.setattr(pack.nodes.compile, "cpp_wrapper_unavailable", lambda: None)
    monkeypatch.setattr(pack.nodes.graph, "graph_model", lambda patcher: patcher)
    monkeypatch.setattr(pack.convrot.graphs, "async_allocator", lambda: True)
    monkeypatch.setattr(pack.convrot.routes, "route_for", lambda device: types.SimpleNamespace(name=route))
    patcher = types.SimpleNamespace(load_device=torch.device("cuda", 0))
    with caplog.at_level(logging.INFO, logger="convrot"):
        assert loader.with_speed(patcher, "auto") is patcher
    assert any(says in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
