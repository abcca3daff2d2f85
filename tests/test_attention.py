"""The quantized attention: reference (convrot/attention.py), Triton kernel (convrot/triton_attention.py), node.

CPU: the reference against exact softmax attention (bounded error; K smoothing changes nothing in exact arithmetic
and helps once quantized), its closed-form online softmax against a literal block loop, the custom op (opcheck,
torch.compile without graph breaks), the Triton kernels in Triton's interpreter on small shapes (bit-equal to the
reference), and the ComfyUI node on a tiny FLUX (passes through on the CPU; the forced reference changes the output
a little). GPU (skipped without CUDA): the compiled kernel against the reference and SDPA on FLUX shapes, under
torch.compile and in a CUDA graph.

Inputs: Gaussian q, k, v with DiT-like structure: a few outlier channels (x8 in q and k), a common per-channel
offset on K (what K smoothing removes) and on V.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from convrot import attention as A

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Reference vs exact attention (relative L2 over the output), measured on these inputs (fp32 in): fp8 P·V 2.3-3.1%,
# bf16 P·V 1.6-2.6% (that part is the INT8 Q/K rounding, amplified by the x8 outlier channels), at L 77..1000; bf16
# SDPA itself is at 0.7-1.3% here. Bounds at ~2x the worst measured: an indexing, scale or softmax bug gives O(1).
BOUND_EXACT = {"fp8": 0.06, "bf16": 0.05}
# Kernel vs reference on the GPU: the same codes and block order; what differs is exp2 (ex2.approx, ~2 ulp), the
# fp32 summation order of l and of the MMAs, and the rare P or V code these flip by one e4m3/bf16 step; the output is
# rounded to bf16 (2^-9 relative) in both. 5e-3 is ~4x bf16's rounding noise and 10x below the quantization error.
BOUND_KERNEL = 5e-3


def qkv(b=1, h=2, lq=77, lk=None, d=128, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g) + 3.0 * torch.randn(1, h, 1, d, generator=g)
    v = torch.randn(b, h, lk, d, generator=g) + torch.randn(1, h, 1, d, generator=g)
    ch = torch.randperm(d, generator=g)[:3]
    q[..., ch] *= 8.0
    k[..., ch] *= 8.0
    return tuple(t.to(device, dtype) for t in (q, k, v))


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ reference (CPU)

@pytest.mark.parametrize("pv", ["fp8", "bf16"])
@pytest.mark.parametrize("lq,lk", [(77, 77), (1000, 1000), (130, 333)])
def test_reference_error_bounded(pv, lq, lk):
    q, k, v = qkv(lq=lq, lk=lk, seed=lq + lk)
    cfg = replace(A.DEFAULT, pv=pv)
    out = A.reference_attention(q, k, v, cfg)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel(out, A.exact_attention(q, k, v))
    assert 1e-4 < err < BOUND_EXACT[pv], err


def test_reference_bf16_inputs_and_scale():
    q, k, v = qkv(lq=200, dtype=torch.bfloat16)
    out = A.reference_attention(q, k, v, sm_scale=0.05)
    assert out.dtype == torch.bfloat16
    assert rel(out, A.exact_attention(q, k, v, sm_scale=0.05)) < BOUND_EXACT["fp8"]


def test_unquantized_config_is_exact_and_smoothing_invariant():
    """No quantization: the closed-form online softmax is softmax; subtracting K's mean changes nothing."""
    q, k, v = qkv(lq=300, lk=250, seed=3)
    exact = A.exact_attention(q, k, v)
    plain = replace(A.DEFAULT, quant_qk=False, pv="none", smooth_k=False)
    smooth = replace(plain, smooth_k=True)
    a, b = A.reference_attention(q, k, v, plain), A.reference_attention(q, k, v, smooth)
    assert rel(a, exact) < 1e-5 and rel(b, exact) < 1e-5
    assert rel(a, b) < 1e-5


def test_smoothing_helps_once_quantized():
    q, k, v = qkv(lq=256, seed=4)
    exact = A.exact_attention(q, k, v)
    on = rel(A.reference_attention(q, k, v, replace(A.DEFAULT, pv="none")), exact)
    off = rel(A.reference_attention(q, k, v, replace(A.DEFAULT, pv="none", smooth_k=False)), exact)
    assert on < 0.8 * off, (on, off)
    von = rel(A.reference_attention(q, k, v, A.DEFAULT), exact)
    voff = rel(A.reference_attention(q, k, v, replace(A.DEFAULT, smooth_v=False)), exact)
    assert von <= voff * 1.05, (von, voff)


def test_quantize_blocks():
    x = torch.randn(2, 3, 100, 64) * torch.linspace(0.1, 10, 100)[:, None]
    codes, scale = A.quantize_blocks(x, 64)
    assert codes.dtype == torch.int8 and codes.shape == (2, 3, 128, 64) and scale.shape == (2, 3, 2)
    assert int(codes.abs().max()) == 127 and not codes[:, :, 100:].any()
    deq = codes[:, :, :100].float() * scale.repeat_interleave(64, -1)[..., :100, None]
    assert float((deq - x).abs().max()) <= float(scale.max()) / 2 + 1e-6


def _loop_reference(q, k, v, cfg):
    """The kernel's algorithm written out: a Python loop over key blocks with a running max (fp8 P·V)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    mult = A.default_scale(d) * A.LOG2E
    qc, qs = A.quantize_blocks(q, cfg.q_block, mult=mult)
    kc, ks = A.quantize_blocks(k, cfg.k_block, A.token_mean(k))
    vc, vs, vmu = A.quantize_v_fp8(v, True)
    qs_rows = qs.repeat_interleave(cfg.q_block, -1)[..., :lq, None]
    m = torch.full((b, h, lq, 1), float("-inf"))
    l_row = torch.zeros(b, h, lq, 1)
    acc = torch.zeros(b, h, lq, d)
    for j, s in enumerate(range(0, lk, cfg.k_block)):
        e = min(lk, s + cfg.k_block)
        sc = (qc[:, :, :lq].float() @ kc[:, :, s:e].float().transpose(-1, -2)) * qs_rows * ks[..., j, None, None]
        m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(sc - m_new)
        l_row = l_row * alpha + p.sum(-1, keepdim=True)
        p8 = (p * A.FP8_MAX).to(torch.float8_e4m3fn).float()
        acc = acc * alpha + p8 @ vc[:, :, s:e].float()
        m = m_new
    return (acc / l_row) * (vs[:, :, None] / A.FP8_MAX) + vmu[:, :, None]


def test_closed_form_online_softmax_matches_block_loop():
    q, k, v = qkv(lq=150, lk=200, seed=5)
    got = A.reference_attention(q, k, v, A.DEFAULT)
    want = _loop_reference(q, k, v, A.DEFAULT)
    assert rel(got, want) < 1e-5


def test_config_is_data():
    assert A.DEFAULT.pv == "fp8" and A.DEFAULT.quant_qk and A.DEFAULT.smooth_k
    assert A.VARIANTS["qattn"] is A.DEFAULT and A.VARIANTS["qattn-bf16pv"].pv == "bf16"
    assert A.for_device(A.DEFAULT, (8, 0)).pv == "bf16" and A.for_device(A.DEFAULT, (9, 0)).pv == "fp8"
    with pytest.raises(ValueError, match="pv"):
        A.QAttnConfig(pv="int4")
    with pytest.raises(ValueError, match="k_block"):
        A.QAttnConfig(k_block=48)


def test_bad_inputs_name_the_shapes():
    q, k, v = qkv(lq=16)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        A.reference_attention(q[0], k, v)
    with pytest.raises(ValueError, match="do not match"):
        A.reference_attention(q, k[..., :64], v)


# ------------------------------------------------------------------------------------------------ custom op (CPU)

def test_custom_op_cpu_is_the_reference_and_traceable():
    from convrot import triton_attention as T
    q, k, v = qkv(b=2, lq=70, seed=6)
    out = T.run_op(q, k, v)
    assert out.shape == (2, 70, 2, 128)
    assert torch.equal(out, A.reference_attention(q, k, v).transpose(1, 2))
    sm = A.default_scale(128)
    torch.library.opcheck(T.attention_op(), (q, k, v, sm, 128, 64, True, True, "fp8"),
                          test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v):
        return T.run_op(q, k, v).reshape(2, 70, -1) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")  # fullgraph: no graph break around the op
    assert torch.equal(compiled(q, k, v), f(q, k, v))


# ------------------------------------------------------------------------------------------------ interpreter (CPU)

@pytest.fixture(scope="module")
def interp_kernels():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if CUDA:
        pytest.skip("CUDA present: the kernels are compiled (GPU tests below)")
    from convrot import triton_attention as T
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        j = T._jit()
        if not j.INTERPRET:
            pytest.skip("the kernels were loaded earlier without TRITON_INTERPRET")
        yield T
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.mark.parametrize("pv", ["fp8", "bf16"])
@pytest.mark.parametrize("b,h,lq,lk,d", [(1, 2, 77, 77, 128), (2, 1, 130, 200, 64)])
def test_interpreted_kernel_matches_reference(interp_kernels, pv, b, h, lq, lk, d):
    """Triton's interpreter runs the kernels' arithmetic on the CPU (the conversions rounded to nearest even as on
    the GPU): the same codes and, with fp8 P·V, the same output bits."""
    T = interp_kernels
    cfg = replace(A.DEFAULT, pv=pv)
    q, k, v = qkv(b, h, lq, lk, d, seed=lq, dtype=torch.bfloat16)
    v = v.transpose(1, 2).contiguous().transpose(1, 2)  # strided V, as FLUX's qkv split gives
    out = T.attention(q, k, v, cfg)
    want = A.reference_attention(q, k, v, cfg)
    assert out.shape == want.shape and out.dtype == want.dtype
    ops = T.quantize(q, k, v, cfg)
    qc, _ = A.quantize_blocks(q, cfg.q_block, mult=A.default_scale(d) * A.LOG2E)
    kc, _ = A.quantize_blocks(k, cfg.k_block, A.token_mean(k))
    assert torch.equal(ops["qc"].reshape(qc.shape), qc) and torch.equal(ops["kc"].reshape(kc.shape), kc)
    assert rel(out, want) < (1e-6 if pv == "fp8" else 2e-4)


# ------------------------------------------------------------------------------------------------ GPU

GPU_SHAPES = [(1, 24, 4608, 4608), (1, 24, 4096 + 512 + 77, None), (1, 24, 1280, None), (2, 24, 77, None),
              (1, 24, 1000, None), (1, 4, 333, 1000)]


@pytest.fixture(scope="module")
def gpu():
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from convrot import triton_attention as T
    ok, why = T.available("cuda")
    if not ok:
        pytest.fail(f"the kernel should run on this GPU: {why}")
    return T


@needs_cuda
@pytest.mark.parametrize("pv", ["fp8", "bf16"])
@pytest.mark.parametrize("b,h,lq,lk", GPU_SHAPES)
def test_gpu_kernel_vs_reference_and_sdpa(gpu, pv, b, h, lq, lk):
    T = gpu
    cfg = T.device_config(replace(A.DEFAULT, pv=pv), "cuda")
    q, k, v = qkv(b, h, lq, lk, seed=lq, dtype=torch.bfloat16, device="cuda")
    out = T.attention(q, k, v, cfg)
    want = A.reference_attention(q, k, v, cfg)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    exact = A.exact_attention(q, k, v) if lq * (lk or lq) * h <= 24 * 1280 * 1280 else sdpa.double()
    e_ref, e_kernel = rel(want, exact), rel(out, exact)
    assert rel(out, want) < BOUND_KERNEL, (rel(out, want), cfg.describe())
    assert e_kernel < max(BOUND_EXACT[cfg.pv], 1.1 * e_ref + 2e-3), (e_kernel, e_ref)
    assert rel(out, sdpa) < BOUND_EXACT[cfg.pv]


@needs_cuda
def test_gpu_fp16_d64_strided(gpu):
    T = gpu
    q, k, v = qkv(1, 8, 700, 900, d=64, seed=7, dtype=torch.float16, device="cuda")
    v = v.transpose(1, 2).contiguous().transpose(1, 2)
    cfg = T.device_config(A.DEFAULT, "cuda")
    assert rel(T.attention(q, k, v, cfg), A.reference_attention(q, k, v, cfg)) < BOUND_KERNEL


@needs_cuda
@pytest.mark.parametrize("cfg", [(64, 4, 3), (128, 8, 3), (128, 4, 4)])
def test_gpu_tile_configs_agree(gpu, cfg):
    T = gpu
    q, k, v = qkv(1, 4, 1000, seed=8, dtype=torch.bfloat16, device="cuda")
    c = T.device_config(A.DEFAULT, "cuda")
    base = T.attention(q, k, v, c)
    assert rel(T.attention(q, k, v, c, config=cfg), base) < 1e-3


@needs_cuda
def test_gpu_op_compiles_and_graphs(gpu):
    """torch.compile (Inductor) keeps the op one node; a CUDA graph of it (PyTorch's native allocator) replays the
    eager result: no host synchronisation in the call."""
    T = gpu
    cfg = T.device_config(A.DEFAULT, "cuda")
    q, k, v = qkv(1, 24, 1280, seed=9, dtype=torch.bfloat16, device="cuda")

    def f(q, k, v):
        return T.run_op(q * 1.0, k, v, cfg).reshape(1, 1280, -1)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)
    assert rel(compiled(q, k, v), eager) < 1e-6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f(q, k, v)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f(q, k, v)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@needs_cuda
def test_gpu_available_says_what_runs(gpu):
    ok, why = gpu.available("cuda")
    assert ok and "Triton" in why and ("FP8" in why or "16-bit" in why)


# ------------------------------------------------------------------------------------------------ ComfyUI node (CPU)

@pytest.fixture(scope="module")
def flux_model(comfy):
    from comfy_env import TINY_NAME, tiny_state_dict, write_file
    write_file(comfy, TINY_NAME, tiny_state_dict())
    return comfy.nodes.UNETLoader().load_unet(TINY_NAME, "default")[0]


def test_node_registered(comfy):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotQuantizedAttention"]
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["ConvRotQuantizedAttention"] == "ConvRot Quantized Attention"
    s = node.GET_SCHEMA()
    assert s.category == "model/optimization"
    assert [i.id for i in s.inputs] == ["model"] and [o.io_type for o in s.outputs] == ["MODEL"]


def test_node_on_cpu_passes_through_and_reference_is_close(comfy, flux_model, monkeypatch, caplog):
    from comfy_env import node_output, sample
    mod = comfy.pack.nodes.attention
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotQuantizedAttention"]
    monkeypatch.delenv(mod.ENV_REFERENCE, raising=False)
    base = sample(comfy, flux_model)
    with caplog.at_level("INFO", logger="convrot"):
        same = node_output(node.execute(flux_model))[0]
    assert same is flux_model  # unchanged: no override installed
    assert mod.OVERRIDE_KEY not in same.model_options["transformer_options"]
    assert sum("passes through" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(sample(comfy, same), base)

    monkeypatch.setenv(mod.ENV_REFERENCE, "1")
    calls = []
    real = comfy.pack.convrot.triton_attention.run_op
    monkeypatch.setattr(comfy.pack.convrot.triton_attention, "run_op",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    quant = node_output(node.execute(flux_model))[0]
    assert quant is not flux_model
    to = quant.model_options["transformer_options"]
    assert getattr(to[mod.OVERRIDE_KEY], "convrot_qattn", None) is not None and mod.MARKER_KEY in to
    assert mod.OVERRIDE_KEY not in flux_model.model_options["transformer_options"]  # the input model is untouched
    y = sample(comfy, quant)
    assert calls, "the quantized attention never ran"
    err = rel(y, base)
    # 2 steps of a random tiny FLUX (4 blocks): attention error of a few % per call, damped by the residual stream
    assert 0 < err < 0.05, err
    twice = node_output(node.execute(quant))[0]  # applying it twice keeps one quantized attention
    assert twice.model_options["transformer_options"][mod.OVERRIDE_KEY].convrot_previous is None
    assert torch.equal(sample(comfy, twice), y)


def test_calls_the_kernel_does_not_take_run_comfyuis_attention(comfy):
    """Full-precision requests (low_precision_attention=False, as ComfyUI's sage attention honours) and k/v of
    lengths or head sizes that do not pair run the attention below the override, never the quantized one."""
    mod = comfy.pack.nodes.attention
    ov = mod.make_override(comfy.pack.convrot.attention.DEFAULT, reference=True)
    ran = []

    def below(q, k, v, heads, **kw):
        ran.append(kw.get("skip_reshape"))
        return torch.zeros(q.shape[0], q.shape[-2] if kw.get("skip_reshape") else q.shape[1], 8)
    q = torch.randn(1, 2, 50, 64)
    assert ov(below, q, q, q, 2, skip_reshape=True, low_precision_attention=False).shape == (1, 50, 8)
    assert ov(below, q, torch.randn(1, 2, 40, 64), torch.randn(1, 2, 41, 64), 2, skip_reshape=True).shape[1] == 50
    assert ov(below, q, torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 32), 2, skip_reshape=True).shape[1] == 50
    q3 = torch.randn(1, 50, 128)
    assert ov(below, q3, torch.randn(1, 40, 128), torch.randn(1, 41, 128), 2).shape[1] == 50
    assert ran == [True, True, True, False]
    out = ov(below, q, q, q, 2, skip_reshape=True)  # a call it takes: quantized (the reference on the CPU)
    assert ran == [True, True, True, False] and out.shape == (1, 50, 128)
