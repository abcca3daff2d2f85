"""Regular Hadamard matrices of size 4^k and a fast transform that applies them.

A *regular* Hadamard matrix has equal row sums. ConvRot uses it instead of the Sylvester (Walsh) matrix because
the Sylvester matrix's first row is all ones: a token whose channels share a large common offset (a row-wise
outlier) is then funnelled into one output channel. Equal row sums spread that offset over every channel.
"""
from __future__ import annotations

import torch

SUPPORTED_GROUP_SIZES = (16, 64, 256)

# The 4x4 regular Hadamard; it is symmetric, so every Kronecker power is symmetric too, and with orthogonality
# that makes the normalized matrix its own inverse (the same op rotates weights and activations and undoes both).
H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def check_group_size(group_size: int) -> int:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"ConvRot group size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    return group_size


def _build(size: int, device=None) -> torch.Tensor:
    if size < 4 or size & (size - 1) or (size.bit_length() - 1) % 2:
        raise ValueError(f"regular Hadamard size must be a power of 4 (>= 4), got {size}")
    h4 = torch.tensor(H4, dtype=torch.float64, device=device)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return (h / size**0.5).to(torch.float32)


_kept: dict = {}


def _tracing() -> bool:
    """Whether tensors made now would belong to a trace: under Dynamo, or where AOTAutograd runs Python on fake or
    functional tensors (a QuantizedTensor's dispatch, where torch 2.11's is_compiling() is False)."""
    if torch.compiler.is_compiling():
        return True
    try:
        key = torch._C._TorchDispatchModeKey
        return any(torch._C._get_dispatch_mode(k) is not None for k in (key.FAKE, key.FUNCTIONAL, key.PROXY))
    except AttributeError:  # a torch without these private hooks: the type check below still keeps fakes out
        return False


def regular_hadamard(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized regular Hadamard of order `size` (a power of 4): orthogonal, symmetric, equal row sums.

    Kept per device and dtype in eager code; built afresh while a trace runs: a tensor kept from one trace is fake
    in the next ("Mixing fake modes"), and a kept real one is not allowed among fake tensors."""
    if _tracing():
        return _build(size, device).to(dtype)
    key = (size, torch.device(device if device is not None else "cpu"), dtype)
    h = _kept.get(key)
    if h is None:
        h = _build(size, key[1]).to(dtype)
        if type(h) is torch.Tensor:  # never keep a fake or functional tensor
            _kept[key] = h
    return h


def fast_regular_hadamard(x: torch.Tensor, size: int) -> torch.Tensor:
    """x[..., size] @ H_size by radix-4 butterflies in fp32: O(size log size) instead of O(size^2).

    H_{4^k} = H4 ⊗ H_{4^(k-1)}, so each stage mixes the four quarter-blocks of one base-4 digit with H4. This is
    the reference for what the CUDA kernel computes in registers.
    """
    if x.shape[-1] != size:
        raise ValueError(f"last dim {x.shape[-1]} != transform size {size}")
    lead = x.shape[:-1]
    y = x.to(torch.float32).reshape(-1, size)
    stride = size // 4
    while stride >= 1:
        # view the index as (outer, digit, inner) with `digit` the base-4 digit of weight `stride`
        v = y.reshape(y.shape[0], -1, 4, stride)
        a, b, c, d = v.unbind(2)
        s = a + b + c + d
        # row i of H4 is all ones except a -1 at column 3-i, so row_i · v = s - 2 * v[3-i]
        y = torch.stack((s - 2 * d, s - 2 * c, s - 2 * b, s - 2 * a), dim=2).reshape(y.shape[0], size)
        stride //= 4
    return (y * (1.0 / size**0.5)).reshape(*lead, size)
