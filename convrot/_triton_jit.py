"""The Triton kernels behind convrot.triton_kernels (import that module, not this one: it imports triton eagerly).

Whether these run compiled or in Triton's CPU interpreter is fixed when this module is imported
(TRITON_INTERPRET=1 at that moment -> interpreter); `INTERPRET` records which.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import SPLIT_CHUNK as _SPLIT_CHUNK

# 1.5 * 2^23: for |v| < 2^22, v + C holds v rounded to the nearest integer (ties to even) in its low mantissa bits
# (no libdevice call, so it is the same on NVIDIA, AMD and the interpreter); _store_codes takes the code from there.
ROUND_MAGIC = tl.constexpr(12582912.0)  # jit code may read module globals only as constexpr
# The split activation order: within each CHUNK channels, the HALF even channels first, then the HALF odd ones,
# so a packed weight's low / high nibbles of bytes [c*HALF, (c+1)*HALF) meet contiguous code runs.
CHUNK = tl.constexpr(_SPLIT_CHUNK)
HALF = tl.constexpr(_SPLIT_CHUNK // 2)


@triton.jit
def _dot_h(z, h, DOT_F32: tl.constexpr):
    """z [R, S] (fp16/bf16/fp32) @ h [S, S] (entries +-1, fp32) -> fp32; every product is exact.

    fp16/bf16 z: one tensor-core dot in z's dtype with fp32 accumulation (h is exact in any float type).
    fp32 z: split into three bf16 pieces (z = z1 + z2 + z3 to within fp32 rounding) and three bf16 dots, so the
    tensor cores give an fp32-accurate product (TF32 would keep only 10 mantissa bits).
    DOT_F32 (the interpreter, whose bf16 dot is broken) runs the same pieces as fp32 dots.
    """
    if z.dtype == tl.float32:
        z1 = z.to(tl.bfloat16)
        r1 = z - z1.to(tl.float32)
        z2 = r1.to(tl.bfloat16)
        r2 = r1 - z2.to(tl.float32)
        z3 = r2.to(tl.bfloat16)
        if DOT_F32:
            acc = tl.dot(z3.to(tl.float32), h, input_precision="ieee", out_dtype=tl.float32)
            acc = tl.dot(z2.to(tl.float32), h, acc, input_precision="ieee", out_dtype=tl.float32)
            acc = tl.dot(z1.to(tl.float32), h, acc, input_precision="ieee", out_dtype=tl.float32)
        else:
            hb = h.to(tl.bfloat16)
            acc = tl.dot(z3, hb, out_dtype=tl.float32)
            acc = tl.dot(z2, hb, acc, out_dtype=tl.float32)
            acc = tl.dot(z1, hb, acc, out_dtype=tl.float32)
    else:
        if DOT_F32:
            acc = tl.dot(z.to(tl.float32), h, input_precision="ieee", out_dtype=tl.float32)
        else:
            acc = tl.dot(z, h.to(z.dtype), out_dtype=tl.float32)
    return acc


@triton.jit
def _rotate_tile(x, h, G: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] (BLOCK_K a multiple of G) -> block-diagonal x @ H_G in fp32.

    G = 16 / 64: one dot of [BLOCK_M * BLOCK_K / G, G] with the unnormalized H_G (h is G x G).
    G = 256: H_256 = H_16 (x) H_16, so each group viewed as a 16 x 16 matrix X becomes H_16 X H_16 (h is 16 x 16):
    two small dots with a transpose between them instead of one 256 x 256 operand.
    """
    if G == 256:
        R: tl.constexpr = BLOCK_M * BLOCK_K // 256
        z = _dot_h(tl.reshape(x, (R * 16, 16)), h, DOT_F32)
        z = tl.reshape(tl.permute(tl.reshape(z, (R, 16, 16)), (0, 2, 1)), (R * 16, 16))
        z = _dot_h(z, h, DOT_F32)
        z = tl.reshape(tl.permute(tl.reshape(z, (R, 16, 16)), (0, 2, 1)), (BLOCK_M, BLOCK_K))
    else:
        z = tl.reshape(_dot_h(tl.reshape(x, (BLOCK_M * BLOCK_K // G, G)), h, DOT_F32), (BLOCK_M, BLOCK_K))
    return z * NORM  # NORM = 1/sqrt(G) is a power of two: exact


@triton.jit
def _fwht_rev(x, R: tl.constexpr, G: tl.constexpr):
    """x fp32 [R, C] (C = a multiple of G; R * C / G groups) -> per group, (x @ H_G) in group-reversed order.

    H_4 = J - 2 P (J all ones, P the reversal) and P commutes with J - 2I, so H_G = H_4 (x) .. (x) H_4 =
    P_G (J - 2I)^(x)n with P_G the reversal of each group (index i -> i ^ (G - 1)). Each J - 2I factor is one
    sum over a size-4 axis and s - 2 v (the identity hadamard.fast_regular_hadamard uses): additions in
    registers and lane shuffles, no tensor cores (the kernels' stores still convert layouts through shared
    memory). The reversal is left to the caller's store addresses (the absmax does not depend on the order).
    """
    NG: tl.constexpr = R * (x.shape[1] // G)
    if G == 16:
        z = tl.reshape(x, (NG, 4, 4))
        z = tl.sum(z, axis=1, keep_dims=True) - 2.0 * z
        z = tl.sum(z, axis=2, keep_dims=True) - 2.0 * z
    elif G == 64:
        z = tl.reshape(x, (NG, 4, 4, 4))
        z = tl.sum(z, axis=1, keep_dims=True) - 2.0 * z
        z = tl.sum(z, axis=2, keep_dims=True) - 2.0 * z
        z = tl.sum(z, axis=3, keep_dims=True) - 2.0 * z
    else:
        tl.static_assert(G == 256)
        z = tl.reshape(x, (NG, 4, 4, 4, 4))
        z = tl.sum(z, axis=1, keep_dims=True) - 2.0 * z
        z = tl.sum(z, axis=2, keep_dims=True) - 2.0 * z
        z = tl.sum(z, axis=3, keep_dims=True) - 2.0 * z
        z = tl.sum(z, axis=4, keep_dims=True) - 2.0 * z
    return tl.reshape(z, (R, x.shape[1]))


@triton.jit
def _runs(x, BLOCK_M: tl.constexpr, N: tl.constexpr, RUN: tl.constexpr, FLIP: tl.constexpr):
    """x [BLOCK_M, N] -> [BLOCK_M, N // RUN, RUN], each run of RUN values (1, 2 or 4) reversed if FLIP. Splits
    and joins of size-2 axes only: where a run lies in one thread's registers it is a renaming of registers."""
    z = tl.reshape(x, (BLOCK_M, N // RUN, RUN))
    if FLIP and RUN >= 2:
        z = tl.reshape(z, (BLOCK_M, N // RUN, RUN // 2, 2))
        lo, hi = tl.split(z)
        z = tl.join(hi, lo)  # the low index bit flipped
        if RUN == 4:
            lo, hi = tl.split(tl.permute(z, (0, 1, 3, 2)))
            z = tl.permute(tl.join(hi, lo), (0, 1, 3, 2))  # the high one
        z = tl.reshape(z, (BLOCK_M, N // RUN, RUN))
    return z


@triton.jit
def _run_index(base, N: tl.constexpr, RUN: tl.constexpr, REV: tl.constexpr, SPAN: tl.constexpr):
    """[N // RUN, RUN] channel index of _runs(x, .., FLIP=REV)'s value [t, i] (REV: x's position j holds channel
    j ^ (SPAN - 1), SPAN a multiple of RUN; else channel j), offset by base (a multiple of SPAN). Written as a run
    start plus tl.arange(0, RUN), so that the stores see RUN contiguous channels per run."""
    t = tl.arange(0, N // RUN) * RUN
    if REV:
        t = t ^ (SPAN - RUN)  # (t + RUN - 1 - i) ^ (SPAN - 1) = (t ^ (SPAN - RUN)) + i
    return tl.multiple_of(base + t, RUN)[:, None] + tl.arange(0, RUN)[None, :]


@triton.jit
def _store_codes(r, mul, q_rows, k0, K, m_ok, G: tl.constexpr, PACK: tl.constexpr, SPLIT: tl.constexpr,
                 REV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RUN: tl.constexpr = 4):
    """code = rint(r * mul[row]) for the tile r [BLOCK_M, BLOCK_K] at channels k0.. (k0 a multiple of G), stored
    as PACK (two int4 per byte, low nibble = even channel), SPLIT (int8, the split chunk order) or int8 channel
    order. REV: r's positions are group-reversed (_fwht_rev): position p holds channel p ^ (G - 1).

    mul = (normalization) / scale, rounded once per row: r * (1/s) differs from the reference's r / s by about an
    ulp, which moves a code only when r / s lies within ~2^-21 of a half-integer (the CUDA extension rounds the
    same way). No clamp: |r| <= absmax keeps |r * mul| <= QMAX (1 + 2^-23), which rounds to QMAX. r * mul + 1.5 *
    2^23 (one FMA where contraction is on) holds the rounded code in its low mantissa bits, so the code is the
    low byte (nibble) of its bit pattern: no division, compare or float-to-int conversion per element.
    Stores go out in runs of RUN channels: with REV each run is reversed in registers first, so that its
    addresses ascend (descending addresses would make Triton store byte by byte through a layout conversion).
    """
    y = r * tl.broadcast_to(mul[:, None], (BLOCK_M, BLOCK_K)) + ROUND_MAGIC
    q = y.to(tl.int32, bitcast=True)  # 0x4B400000 + code: low byte = the int8 code, low nibble = the int4 one
    if PACK or SPLIT:
        NP: tl.constexpr = BLOCK_K // 2
        RP: tl.constexpr = RUN if RUN <= NP else NP
        a, b = tl.split(tl.reshape(q, (BLOCK_M, NP, 2)))  # positions 2j, 2j + 1
        if REV:  # positions 2j, 2j + 1 hold channels 2p + 1, 2p with p = j ^ (G/2 - 1)
            a, b = b, a
        ev = _runs(a, BLOCK_M, NP, RP, REV)
        od = _runs(b, BLOCK_M, NP, RP, REV)
        jp = _run_index(k0 // 2, NP, RP, REV, G // 2)  # channel pairs
        ok = m_ok[:, None, None] & (jp[None, :, :] < K // 2)
        if PACK:
            tl.store(q_rows[:, :, None] + jp[None, :, :], ((ev & 15) | (od << 4)).to(tl.int8), mask=ok)
        else:
            tl.static_assert(BLOCK_K // CHUNK * CHUNK == BLOCK_K)
            col = (jp // HALF) * CHUNK + jp % HALF  # pair jp: channels 2jp, 2jp + 1; runs of HALF bytes
            tl.store(q_rows[:, :, None] + col[None, :, :], ev.to(tl.int8), mask=ok)
            tl.store(q_rows[:, :, None] + (col + HALF)[None, :, :], od.to(tl.int8), mask=ok)
    else:
        RQ: tl.constexpr = RUN if RUN <= BLOCK_K else BLOCK_K
        kk = _run_index(k0, BLOCK_K, RQ, REV, G)
        tl.store(q_rows[:, :, None] + kk[None, :, :], _runs(q, BLOCK_M, BLOCK_K, RQ, REV).to(tl.int8),
                 mask=m_ok[:, None, None] & (kk[None, :, :] < K))


@triton.jit
def _row_scale(amax, NORM_SUMS: tl.constexpr, s_ptr, rm, m_ok, QMAX: tl.constexpr, BLOCK_M: tl.constexpr):
    """Stores the reference's scale, max(absmax * NORM_SUMS, 1e-10) / QMAX (IEEE division; NORM_SUMS, the
    normalization the rotated sums still need, is a power of two: exact), and returns _store_codes' multiplier
    NORM_SUMS / scale, rounded once per row."""
    scale = tl.math.div_rn(tl.maximum(amax * NORM_SUMS, 1e-10), tl.full((BLOCK_M,), QMAX, tl.float32))
    tl.store(s_ptr + rm, scale, mask=m_ok)
    return tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale) * NORM_SUMS


@triton.jit
def rotate_quantize_kernel(x_ptr, h_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, M_BUCKET,
                           G: tl.constexpr, HS: tl.constexpr, NORM: tl.constexpr, QMAX: tl.constexpr,
                           PACK: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FWHT: tl.constexpr = False):
    """Per row: r = x @ blockdiag(H_G) (fp32), scale = max(absmax(r), 1e-10) / QMAX, code = rint(r * (1 / scale)).

    Two passes over the row block: the first finds absmax, the second recomputes the rotation and writes codes,
    so a row never has to fit in registers. The rotation: tensor-core dots with h (FWHT False, the "dot" method)
    or _fwht_rev in registers (FWHT True, the "fwht" method; h unused). PACK: two int4 codes per byte, low
    nibble = even channel; else one int8 code per channel, in channel order or (SPLIT) in the split chunk order
    that gemm_split_kernel reads: per CHUNK channels, the even ones first, then the odd ones.
    """
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rows = tl.where(m_ok, rm, 0).to(tl.int64)
    rh = tl.arange(0, HS)
    if not FWHT:
        h = tl.load(h_ptr + rh[:, None] * HS + rh[None, :])
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_rows + kk[None, :], mask=kk[None, :] < K, other=0.0)
        if FWHT:
            r = _fwht_rev(x.to(tl.float32), BLOCK_M, G)
        else:
            r = _rotate_tile(x, h, G, NORM, BLOCK_M, BLOCK_K, DOT_F32)
        amax = tl.maximum(amax, tl.max(tl.abs(r), axis=1))
    mul = _row_scale(amax, NORM if FWHT else 1.0, s_ptr, rm, m_ok, QMAX, BLOCK_M)  # _fwht_rev does not normalize
    q_rows = q_ptr + rows[:, None] * stride_qm
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_rows + kk[None, :], mask=kk[None, :] < K, other=0.0)
        if FWHT:
            r = _fwht_rev(x.to(tl.float32), BLOCK_M, G)
        else:
            r = _rotate_tile(x, h, G, NORM, BLOCK_M, BLOCK_K, DOT_F32)
        _store_codes(r, mul, q_rows, k0, K, m_ok, G, PACK, SPLIT, FWHT, BLOCK_M, BLOCK_K)


@triton.jit
def rotate_quantize_row_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, M_BUCKET,
                               G: tl.constexpr, NORM: tl.constexpr, QMAX: tl.constexpr, PACK: tl.constexpr,
                               SPLIT: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr,
                               THIRDS: tl.constexpr = False):
    """The "row" method: one pass, BLOCK_M whole rows held in registers; x is read once. A row is one tile of KP
    (a power of two >= K, the rest masked) or, THIRDS, three tiles of KP = K / 3 (K = 3 * 2^n: 3072, 12288),
    which computes no padding. The rotation is _fwht_rev; codes and scales as rotate_quantize_kernel's."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rows = tl.where(m_ok, rm, 0).to(tl.int64)
    kk = tl.arange(0, KP)
    x_rows = x_ptr + rows[:, None] * stride_xm
    q_rows = q_ptr + rows[:, None] * stride_qm
    if THIRDS:
        r0 = _fwht_rev(tl.load(x_rows + kk[None, :]).to(tl.float32), BLOCK_M, G)
        r1 = _fwht_rev(tl.load(x_rows + (KP + kk)[None, :]).to(tl.float32), BLOCK_M, G)
        r2 = _fwht_rev(tl.load(x_rows + (2 * KP + kk)[None, :]).to(tl.float32), BLOCK_M, G)
        amax = tl.max(tl.maximum(tl.maximum(tl.abs(r0), tl.abs(r1)), tl.abs(r2)), axis=1)  # one reduction
        mul = _row_scale(amax, NORM, s_ptr, rm, m_ok, QMAX, BLOCK_M)
        _store_codes(r0, mul, q_rows, 0, K, m_ok, G, PACK, SPLIT, True, BLOCK_M, KP)
        _store_codes(r1, mul, q_rows, KP, K, m_ok, G, PACK, SPLIT, True, BLOCK_M, KP)
        _store_codes(r2, mul, q_rows, 2 * KP, K, m_ok, G, PACK, SPLIT, True, BLOCK_M, KP)
    else:
        x = tl.load(x_rows + kk[None, :], mask=kk[None, :] < K, other=0.0)
        r = _fwht_rev(x.to(tl.float32), BLOCK_M, G)
        mul = _row_scale(tl.max(tl.abs(r), axis=1), NORM, s_ptr, rm, m_ok, QMAX, BLOCK_M)
        _store_codes(r, mul, q_rows, 0, K, m_ok, G, PACK, SPLIT, True, BLOCK_M, KP)


@triton.jit
def _unpack_int4(p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS // 2] packed bytes -> [ROWS, COLS] int8 codes in channel order (signed nibbles)."""
    p32 = p.to(tl.int32)
    lo = ((p32 << 28) >> 28).to(tl.int8)
    hi = (p32 >> 4).to(tl.int8)
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))


@triton.jit
def _tile_of_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, in grouped order (GROUP_M row tiles share the weight tiles in L2)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, rm, rn, M, N, as_ptr, ws_ptr, b_ptr, y_ptr, stride_ym, HAS_BIAS: tl.constexpr,
              BF16_RTNE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """y = (acc * a_scale[m]) * w_scale[n] (+ bias[n]) in fp32, stored in y's dtype. acc: int32 [BLOCK_M, BLOCK_N]
    tile of rows rm, columns rn, or (TRANSPOSED) its [BLOCK_N, BLOCK_M] transpose, stored without a transpose."""
    m_ok = rm < M
    n_ok = rn < N
    a_s = tl.load(as_ptr + rm, mask=m_ok, other=0.0)
    w_s = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
    if TRANSPOSED:
        y = acc.to(tl.float32) * a_s[None, :] * w_s[:, None]
    else:
        y = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if TRANSPOSED:
            y = y + b[:, None]
        else:
            y = y + b[None, :]
    if BF16_RTNE:
        # The interpreter truncates fp32 -> bf16; round to nearest even by hand (finite values) as the GPU does.
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    if TRANSPOSED:
        y_ptrs = y_ptr + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
    else:
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _nibbles_x16(p, ASM: tl.constexpr):
    """Packed int8 bytes -> (16 * low nibble, 16 * high nibble) as int8, both signed and exact.

    Moving each nibble to the top of its byte needs no sign extension, and the dots' int32 sums are then 16x
    (exact, |sum| < 2^31 for K <= 65536), shifted back once per tile. Per-byte int8 shifts compile to byte
    extract/insert sequences; ASM (NVIDIA only) does the same in three 32-bit ops per 4 bytes.
    """
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
            "=r,=r,r", [p], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    else:
        lo = p << 4
        hi = p & -16
    return lo, hi


@triton.jit
def gemm_kernel(a_ptr, w_ptr, as_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_am, stride_wn, stride_ym, M_BUCKET,
                A_PACKED: tl.constexpr, W_PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, W_X16: tl.constexpr, ASM: tl.constexpr):
    """y[m, n] = (sum_k a[m, k] w[n, k]) * a_scale[m] * w_scale[n] (+ bias[n]), int32 accumulation, fp32 epilogue.

    K counts codes. An operand is packed int4 ([rows, K/2] bytes, sign-extended to int8 in registers) or int8
    codes ([rows, K]); both then meet in one int8 x int8 -> int32 tl.dot. BF16_RTNE: for the interpreter only.
    W_X16 (packed weight): its nibbles unpacked as 16x values (_nibbles_x16, ASM) instead of sign-extended.
    """
    pid_m, pid_n = _tile_of_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past the end read a valid row (its result is never stored), so the loads need no row mask
    ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M).to(tl.int64)
    rwn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N).to(tl.int64)
    KA: tl.constexpr = BLOCK_K // 2 if A_PACKED else BLOCK_K
    KW: tl.constexpr = BLOCK_K // 2 if W_PACKED else BLOCK_K
    ka_total = K // 2 if A_PACKED else K
    kw_total = K // 2 if W_PACKED else K
    a_rows = a_ptr + ram[:, None] * stride_am
    w_rows = w_ptr + rwn[:, None] * stride_wn
    rka = tl.arange(0, KA)
    rkw = tl.arange(0, KW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        ka = kb * KA + rka
        kw = kb * KW + rkw
        if EVEN_K:
            a = tl.load(a_rows + ka[None, :])
            w = tl.load(w_rows + kw[None, :])
        else:
            a = tl.load(a_rows + ka[None, :], mask=ka[None, :] < ka_total, other=0)
            w = tl.load(w_rows + kw[None, :], mask=kw[None, :] < kw_total, other=0)
        if A_PACKED:
            a = _unpack_int4(a, BLOCK_M, BLOCK_K)
        if W_PACKED:
            if W_X16:
                lo, hi = _nibbles_x16(w, ASM)
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
            else:
                w = _unpack_int4(w, BLOCK_N, BLOCK_K)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    if W_PACKED and W_X16:
        acc = acc >> 4  # exact: every product was 16x
    _epilogue(acc, rm, rn, M, N, as_ptr, ws_ptr, b_ptr, y_ptr, stride_ym, HAS_BIAS, BF16_RTNE, False)


@triton.jit
def gemm_split_kernel(a_ptr, w_ptr, as_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_am, stride_wn, stride_ym,
                      M_BUCKET, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr,
                      BF16_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, ONE_DOT: tl.constexpr):
    """gemm_kernel's W4A4 product for int8 activation codes in the split chunk order (rotate_quantize_kernel
    SPLIT) and a packed int4 weight [N, K/2]: per CHUNK, the low nibbles of HALF weight bytes meet the HALF
    even-channel codes and the high nibbles the odd ones, so nothing is interleaved in registers. Two dots of
    K = HALF, or (ONE_DOT) one of K = CHUNK with the weight's nibble halves concatenated along K (a
    concatenation of two register tiles, no element shuffle) against the chunk loaded whole.

    K % BLOCK_K == 0, BLOCK_K a multiple of CHUNK. SWAP: accumulate the transposed tile [BLOCK_N, BLOCK_M] with
    the unpacked weight as the dot's first operand (Hopper's wgmma can read that one from registers instead of
    shared memory) and store it transposed. ASM: see _nibbles_x16.
    """
    tl.static_assert(BLOCK_K // CHUNK * CHUNK == BLOCK_K)
    pid_m, pid_n = _tile_of_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past the end read a valid row (its result is never stored), so the loads need no mask
    ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M).to(tl.int64)
    rwn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N).to(tl.int64)
    rh = tl.arange(0, HALF)
    a_rows = a_ptr + ram[:, None] * stride_am
    w_rows = w_ptr + rwn[:, None] * stride_wn + rh[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(0, K // BLOCK_K):
        for c in tl.static_range(BLOCK_K // CHUNK):
            ka = kb * BLOCK_K + c * CHUNK
            p = tl.load(w_rows + (kb * (BLOCK_K // 2) + c * HALF))
            w_lo, w_hi = _nibbles_x16(p, ASM)
            if ONE_DOT:
                a = tl.load(a_rows + (ka + tl.arange(0, CHUNK))[None, :])
                w = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 2, 1)), (BLOCK_N, CHUNK))  # [lo | hi]
                if SWAP:
                    acc = tl.dot(w, tl.trans(a), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
            else:
                a_lo = tl.load(a_rows + (ka + rh)[None, :])
                a_hi = tl.load(a_rows + (ka + HALF + rh)[None, :])
                if SWAP:
                    acc = tl.dot(w_lo, tl.trans(a_lo), acc, out_dtype=tl.int32)
                    acc = tl.dot(w_hi, tl.trans(a_hi), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
                    acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
    acc = acc >> 4  # exact: every product was 16x
    _epilogue(acc, rm, rn, M, N, as_ptr, ws_ptr, b_ptr, y_ptr, stride_ym, HAS_BIAS, BF16_RTNE, SWAP)


@triton.jit
def _sext_nibbles(t):
    """uint32 words whose bytes hold 0..15 -> each byte's 4-bit value sign-extended to 8 bits (t, or t - 16 for
    t >= 8). Per byte, (t ^ 8) + 0x78 <= 0x87 never carries into the next byte; ^ 0x80 then subtracts 0x80."""
    return ((t ^ 0x08080808) + 0x78787878) ^ 0x80808080


@triton.jit
def unpack_int4_kernel(p_ptr, q_ptr, N, KW, stride_pn, stride_qn, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Packed int4 [N, 4 KW] bytes, read as 32-bit words [N, KW] -> int8 codes [N, 8 KW] in channel order,
    written as 64-bit words [N, KW]: bitwise ops on 4 bytes at a time (per-byte int8 math compiles to byte
    extract/insert sequences), and one output word per input word (no interleave). Strides in words."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = (rn < N)[:, None] & (rw < KW)[None, :]
    rn64 = rn.to(tl.int64)
    x = tl.load(p_ptr + rn64[:, None] * stride_pn + rw[None, :], mask=ok, other=0).to(tl.uint32, bitcast=True)
    lo = _sext_nibbles(x & 0x0F0F0F0F)  # byte i: the code of channel 8w + 2i
    hi = _sext_nibbles((x >> 4) & 0x0F0F0F0F)  # byte i: channel 8w + 2i + 1
    w0 = (lo & 0xFF) | ((hi & 0xFF) << 8) | ((lo & 0xFF00) << 8) | ((hi & 0xFF00) << 16)
    w1 = ((lo >> 16) & 0xFF) | ((hi >> 8) & 0xFF00) | ((lo >> 8) & 0xFF0000) | (hi & 0xFF000000)
    q = w0.to(tl.uint64) | (w1.to(tl.uint64) << 32)  # little-endian: w0's bytes first
    tl.store(q_ptr + rn64[:, None] * stride_qn + rw[None, :], q.to(tl.int64, bitcast=True), mask=ok)


INTERPRET = type(gemm_kernel).__name__ == "InterpretedFunction"

_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})

gemm_fixed = _even_k(gemm_kernel)

GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4, num_stages=4),
]

gemm_tuned = triton.autotune(
    configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "A_PACKED", "W_PACKED", "HAS_BIAS", "W_X16"])(gemm_fixed)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The wgmma M side (BLOCK_M, or BLOCK_N under SWAP) needs
# 64 rows per warpgroup, else mma.sync runs: so the small-M tiles are SWAP's, plus one mma.sync tile without it.
# The large tiles come with ONE_DOT on and off (the two forms of the chunk product), the rest with it on.
_SPLIT_TILES = [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 256, 8, 3)]
_SPLIT_TILES_ONE_DOT = [(128, 128, 128, 4, 4), (64, 128, 256, 4, 3)]
_NO_SWAP_TILES = {(32, 64, 256, 4, 4)}
_SWAP_TILES = {(64, 256, 128, 8, 3), (32, 128, 256, 4, 4), (16, 128, 256, 4, 4)}


def _tile(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


def _split_config(bm, bn, bk, nw, ns, one_dot):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "ONE_DOT": one_dot},
                         num_warps=nw, num_stages=ns)


SPLIT_CONFIGS = ([_split_config(*t, od) for t in _SPLIT_TILES for od in (True, False)]
                 + [_split_config(*t, True) for t in _SPLIT_TILES_ONE_DOT + sorted(_NO_SWAP_TILES | _SWAP_TILES)])


def _prune_split(configs, named_args, **kwargs):
    """The configs of this variant (SWAP or not) whose BLOCK_K divides K (K % 128 == 0: one always does)."""
    other = _NO_SWAP_TILES if kwargs.get("SWAP") else _SWAP_TILES
    return [c for c in configs if named_args["K"] % c.kwargs["BLOCK_K"] == 0 and _tile(c) not in other]


gemm_split_tuned = triton.autotune(
    configs=SPLIT_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS", "SWAP"],
    prune_configs_by={"early_config_prune": _prune_split})(gemm_split_kernel)

ROTQ_CONFIGS = [
    triton.Config({"BLOCK_M": 8, "BLOCK_K": 256}, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 256}, num_warps=8),
]

RQ_KEY = ["M_BUCKET", "K", "G", "QMAX", "PACK", "SPLIT"]  # every rotate+quantize kernel tunes per these

rotate_quantize_tuned = triton.autotune(configs=ROTQ_CONFIGS, key=RQ_KEY)(rotate_quantize_kernel)

# the "fwht" method: small row blocks (the second pass then finds the rows in L2), longer K steps
FWHT_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "FWHT": True}, num_warps=nw)
                for bm, bk, nw in ((4, 512, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4),
                                   (16, 512, 8), (2, 1024, 4))]


def _prune_fwht(configs, named_args, **kwargs):
    """No K step longer than K (past 256: every K here is a multiple of G <= 256)."""
    k = {**named_args, **kwargs}["K"]
    return [c for c in configs if c.kwargs["BLOCK_K"] <= max(256, k)] or configs[:1]


rotate_quantize_fwht_tuned = triton.autotune(
    configs=FWHT_CONFIGS, key=RQ_KEY, prune_configs_by={"early_config_prune": _prune_fwht})(rotate_quantize_kernel)

ROW_MIN_PER_THREAD = 8  # the "row" configs kept hold at least this many values per thread


def _row_range(c) -> tuple[int, int]:
    """Values per thread a row config may hold: at most 64, and at most a quarter of the registers a thread has
    when its block takes the SM's 64K (16 warps: 128 registers, so 32 values; (2 rows, 16 warps) at KP = 16384
    spilled)."""
    return ROW_MIN_PER_THREAD, min(64, 65536 // (32 * c.num_warps) // 4)


def _prune_row(configs, named_args, **kwargs):
    """Configs whose values per thread (BLOCK_M * row values / threads) lie in _row_range; else the nearest one."""
    args = {**named_args, **kwargs}
    kp = args["KP"] * (3 if args.get("THIRDS") else 1)

    def miss(c):
        lo, hi = _row_range(c)
        per = c.kwargs["BLOCK_M"] * kp // (32 * c.num_warps)
        return max(lo - per, per - hi, 0)

    kept = [c for c in configs if miss(c) == 0]
    return kept or [min(configs, key=miss)]


ROW_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=nw) for bm in (1, 2, 4, 8) for nw in (4, 8, 16)]

rotate_quantize_row_tuned = triton.autotune(
    configs=ROW_CONFIGS, key=RQ_KEY, prune_configs_by={"early_config_prune": _prune_row})(rotate_quantize_row_kernel)
