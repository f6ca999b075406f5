"""ggml's block formats, quantized in torch: Q8_0, Q4_0 and Q4_1 blocks of 32 weights each, and Q4_K
super-blocks of 256.

Each function takes a float32 tensor whose rows are whole blocks and returns the blocks' bytes (uint8,
[rows, row_bytes]) as ggml's reference quantizers write them: Q8_0/Q4_0/Q4_1 exactly as gguf.quants.quantize
(the same float32 arithmetic in the same order, and numpy's rounding where ggml rounds; tests/test_export.py
compares them bit for bit); Q4_K, which gguf.quants cannot quantize, as llama.cpp's quantize_row_q4_K_ref
(tests/test_llama_cpp.py compares the bytes with llama.cpp's own). In torch because numpy's takes ~10x
longer on a 135M-parameter model. Reading them back is zoo/ggml_blocks.py's job (its fast dequantizers).
"""
import torch

BLOCK = 32


def _blocks(t):
    if t.shape[-1] % BLOCK:
        raise ValueError(f"rows of {t.shape[-1]} values are not whole blocks of {BLOCK}")
    return t.detach().to(torch.float32).reshape(-1, BLOCK)


def _roundf(x):
    """ggml's roundf (half away from zero), as gguf.quants.np_roundf computes it."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _inverse(d):
    """1/d, and 0 where d is 0 (an all-zero block)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_nibbles(q):
    """32 values 0..15 per block -> 16 bytes: weights 0-15 in the low nibbles, 16-31 in the high ones."""
    q = q.to(torch.uint8).view(-1, 2, BLOCK // 2)
    return q[:, 0] | (q[:, 1] << 4)


def _f16_bytes(x):
    return x.to(torch.float16).view(torch.uint8).view(-1, 2)


def q8_0(t):
    """d = max|x| / 127 (float16), q = round(x / d) (int8)."""
    x = _blocks(t)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _roundf(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1).view(*t.shape[:-1], -1)


def q4_0(t):
    """d = -(the value of largest magnitude) / 8, q = trunc(x / d + 8.5) clipped to 0..15; x = (q - 8) * d."""
    x = _blocks(t)
    extreme = x.gather(1, x.abs().argmax(dim=1, keepdim=True))  # the first of equal magnitudes, as numpy
    d = extreme / -8
    q = (x * _inverse(d) + 8.5).trunc().clamp(0, 15)  # (uint8 before clipping: the same for 0 <= q <= 16.5)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1).view(*t.shape[:-1], -1)


def q4_1(t):
    """d = (max - min) / 15, m = min, q = trunc((x - m) / d + 0.5) clipped to 0..15; x = q * d + m."""
    x = _blocks(t)
    hi, lo = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (hi - lo) / 15
    q = ((x - lo) * _inverse(d) + 0.5).trunc().clamp(0, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], dim=1).view(*t.shape[:-1], -1)


# ----------------------------------------------------------------------------------- Q4_K (k-quants)
# A super-block of 256 weights: eight sub-blocks of 32, each with its own 4-bit scale and min, found by a
# weighted least-squares search (ggml's make_qkx2_quants); the eight scales and mins quantized to 6 bits
# against one float16 scale and one float16 min. Laid out as ggml's block_q4_K: d, dmin (float16),
# scales[12] (the 6-bit values packed), qs[128] (two 4-bit weights a byte: each 64-weight chunk's first 32
# in the low nibbles). Sums run left to right, as ggml's C loops add, so the same float32 roundings decide.
QK_K = 256


def _f32(v):
    return torch.tensor(v, dtype=torch.float32)


def _running_sum(t):
    """Sum over the last axis one term at a time, left to right (not torch's pairwise order)."""
    acc = t[..., 0]
    for i in range(1, t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def _fit_scale_min(x, w, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    """ggml's make_qkx2_quants for rows x [N, 32] with weights w: (scale [N], -min [N], levels [N, 32] in
    0..nmax) with x ~ scale * level + min, min <= 0, minimizing the weighted squared error over the plain
    max-min grid and nstep + 1 nudged ones, each refit by weighted least squares."""
    lo = x.amin(dim=1).clamp(max=0)
    hi = x.amax(dim=1)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    sum_w, sum_x = w[:, 0], w[:, 0] * x[:, 0]
    for i in range(1, x.shape[1]):
        sum_w, sum_x = sum_w + w[:, i], sum_x + w[:, i] * x[:, i]

    def levels(iscale, m):
        return torch.round(iscale[:, None] * (x - m[:, None])).clamp(0, nmax)  # nearest_int: ties to even

    def error(scale, m, q):
        diff = scale[:, None] * q + m[:, None] - x
        return _running_sum(w * (diff * diff))

    iscale = _f32(nmax) / span
    scale, m = 1 / iscale, lo
    q = levels(iscale, m)
    best = error(scale, m, q)
    for step in range(nstep + 1):
        grid = (_f32(rmin) + _f32(rdelta) * _f32(step)) + _f32(nmax)
        span = torch.where(flat, torch.ones_like(hi), hi - m)  # ggml moves the min to each better fit's
        qa = levels(grid / span, m)
        wq = w * qa
        sum_l, sum_l2, sum_xl = _running_sum(wq), _running_sum(wq * qa), _running_sum(wq * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(D > 0, D, torch.ones_like(D))
        s_new = (sum_w * sum_xl - sum_x * sum_l) / safe
        m_new = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = m_new > 0
        s_new = torch.where(positive, sum_xl / torch.where(sum_l2 == 0, torch.ones_like(sum_l2), sum_l2), s_new)
        m_new = torch.where(positive, torch.zeros_like(m_new), m_new)
        err = error(s_new, m_new, qa)
        better = (D > 0) & (err < best)
        best = torch.where(better, err, best)
        scale, m = torch.where(better, s_new, scale), torch.where(better, m_new, m)
        q = torch.where(better[:, None], qa, q)
    zero = torch.zeros_like(scale)
    return torch.where(flat, zero, scale), -torch.where(flat, lo, m), torch.where(flat[:, None], 0, q)


def _q4_k(x):
    """Super-blocks x [B, 256] -> block_q4_K bytes [B, 144]."""
    B = x.shape[0]
    sub = x.reshape(B * 8, 32)
    av_x = torch.sqrt(_running_sum(sub * sub) / 32)
    scales, mins, q = _fit_scale_min(sub, av_x[:, None] + sub.abs())
    scales, mins, q = scales.view(B, 8), mins.view(B, 8), q.view(B, 8, 32)
    max_scale, max_min = (torch.where(v.amax(dim=1) > 0, v.amax(dim=1), 0) for v in (scales, mins))  # not -0.0
    inv_scale = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1), 0)
    inv_min = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1), 0)
    ls = (torch.round(inv_scale[:, None] * scales).long() % 256).clamp(max=63)  # (uint8_t)nearest_int, then MIN 63
    lm = (torch.round(inv_min[:, None] * mins).long() % 256).clamp(max=63)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()
    d_sub = d.float()[:, None] * ls.float()  # [B, 8]
    dm_sub = dmin.float()[:, None] * lm.float()
    requant = torch.round((x.view(B, 8, 32) + dm_sub[..., None]) / torch.where(d_sub == 0, 1, d_sub)[..., None])
    q = torch.where((d_sub == 0)[..., None], q, requant.clamp(0, 15)).to(torch.uint8).view(B, 4, 2, 32)
    packed = torch.zeros(B, 12, dtype=torch.long)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(B, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), packed.to(torch.uint8), qs], dim=1)


def q4_k(t, chunk=1 << 14):
    """ggml's reference Q4_K quantizer (quantize_row_q4_K_ref): blocks of 256 weights, 4.5 bits a weight."""
    if t.shape[-1] % QK_K:
        raise ValueError(f"rows of {t.shape[-1]} values are not whole blocks of {QK_K}")
    x = t.detach().to(torch.float32).reshape(-1, QK_K)
    out = torch.cat([_q4_k(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
    return out.view(*t.shape[:-1], -1)


def bf16(t):
    """bfloat16 bits, rounded to nearest even as ggml (and torch) round them; NaN stays NaN."""
    return t.detach().to(torch.bfloat16).view(torch.uint8).view(*t.shape[:-1], -1)


QUANTIZERS = {"q8_0": q8_0, "q4_0": q4_0, "q4_1": q4_1, "q4_k": q4_k}
BLOCK_SIZES = {"q8_0": BLOCK, "q4_0": BLOCK, "q4_1": BLOCK, "q4_k": QK_K}
