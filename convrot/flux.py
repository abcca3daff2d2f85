"""A compact FLUX.1 transformer in plain PyTorch, with ComfyUI's state-dict names.

It lets the engine's demo, quality report, benchmarks and tests build FLUX-architecture models with seeded random
weights (no weights can be downloaded) and write files that ComfyUI itself detects and loads as FLUX.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FluxConfig:
    in_channels: int = 64          # 16 latent channels x 2x2 patch
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10000
    guidance_embed: bool = True

    @classmethod
    def tiny(cls, hidden: int = 256, depth: int = 2, single: int = 2, guidance: bool = True, vec: int = 256,
             ctx: int = 256) -> "FluxConfig":
        # ComfyUI infers num_heads = hidden / sum(axes_dim) = hidden / 128, so keep head_dim 128
        return cls(vec_in_dim=vec, context_in_dim=ctx, hidden_size=hidden, num_heads=hidden // 128, depth=depth,
                   depth_single_blocks=single, guidance_embed=guidance)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    t = t * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / theta**scale
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def attention(q, k, v, pe):
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        b, l, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, l, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.mult = 6 if double else 3
        self.lin = nn.Linear(dim, self.mult * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.mult, dim=-1)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class DoubleStreamBlock(nn.Module):
    def __init__(self, h, heads, mlp_ratio):
        super().__init__()
        m = int(h * mlp_ratio)
        self.img_mod, self.txt_mod = Modulation(h, True), Modulation(h, True)
        self.img_attn, self.txt_attn = SelfAttention(h, heads), SelfAttention(h, heads)
        self.img_mlp = nn.Sequential(nn.Linear(h, m), nn.GELU(approximate="tanh"), nn.Linear(m, h))
        self.txt_mlp = nn.Sequential(nn.Linear(h, m), nn.GELU(approximate="tanh"), nn.Linear(m, h))

    def forward(self, img, txt, vec, pe):
        im = self.img_mod(vec)
        tm = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads((1 + im[1]) * _ln(img) + im[0])
        tq, tk, tv = self.txt_attn.qkv_heads((1 + tm[1]) * _ln(txt) + tm[0])
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        ta, ia = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + im[2] * self.img_attn.proj(ia)
        img = img + im[5] * self.img_mlp((1 + im[4]) * _ln(img) + im[3])
        txt = txt + tm[2] * self.txt_attn.proj(ta)
        txt = txt + tm[5] * self.txt_mlp((1 + tm[4]) * _ln(txt) + tm[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, h, heads, mlp_ratio):
        super().__init__()
        self.heads, self.h, self.m = heads, h, int(h * mlp_ratio)
        self.linear1 = nn.Linear(h, h * 3 + self.m)
        self.linear2 = nn.Linear(h + self.m, h)
        self.norm = QKNorm(h // heads)
        self.modulation = Modulation(h, False)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * _ln(x) + shift), [3 * self.h, self.m], dim=-1)
        b, l, _ = x.shape
        q, k, v = qkv.reshape(b, l, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        return x + gate * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2))


class LastLayer(nn.Module):
    def __init__(self, h, out):
        super().__init__()
        self.linear = nn.Linear(h, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None]) * _ln(x) + shift[:, None])


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(h, cfg.in_channels)

    def pe(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([rope(ids[..., i], d, self.cfg.theta) for i, d in enumerate(self.cfg.axes_dim)],
                         dim=-3).unsqueeze(1)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, block_hook=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps).to(img.dtype))
        if self.guidance_in is not None:
            g = guidance if guidance is not None else torch.full_like(timesteps, 3.5)
            vec = vec + self.guidance_in(timestep_embedding(g).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe(torch.cat((txt_ids, img_ids), dim=1))
        for blk in self.double_blocks:
            img, txt = blk(img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for blk in self.single_blocks:
            x = blk(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def random_flux(cfg: FluxConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu") -> Flux:
    """A FLUX model with seeded random weights, scaled so activations keep roughly unit variance through the depth.

    Random weights carry none of the outliers of a trained model, so errors measured on it are optimistic; the
    quality tests add synthetic outliers to the inputs they use.
    """
    gen = torch.Generator().manual_seed(seed)
    model = Flux(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                w = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
                if name.endswith(("mod.lin.weight", "modulation.lin.weight", "adaLN_modulation.1.weight")):
                    w *= 0.3
                p.copy_(w)
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.to(device=device, dtype=dtype)


def example_inputs(cfg: FluxConfig, batch: int = 1, height: int = 32, width: int = 32, txt_len: int = 32,
                   seed: int = 0, dtype=torch.bfloat16, device="cpu") -> dict:
    """Patchified latents, ids and conditioning for an image of height x width latent pixels (2x2 patches)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(
        img=r(batch, h * w, cfg.in_channels).to(device, dtype),
        img_ids=ids.reshape(1, h * w, 3).expand(batch, -1, -1).to(device),
        txt=r(batch, txt_len, cfg.context_in_dim).to(device, dtype),
        txt_ids=torch.zeros(batch, txt_len, 3, device=device),
        timesteps=torch.full((batch,), 0.7, device=device),
        y=r(batch, cfg.vec_in_dim).to(device, dtype),
        guidance=torch.full((batch,), 3.5, device=device) if cfg.guidance_embed else None,
    )
