"""ggml's block formats, quantized in torch: Q8_0, Q4_0 and Q4_1 blocks of 32 weights each.

Each function takes a float32 tensor whose rows are whole blocks and returns the blocks' bytes (uint8,
[rows, row_bytes]) exactly as gguf.quants.quantize writes them (ggml's reference quantizers): the same
float32 arithmetic in the same order, and numpy's rounding where ggml rounds (tests/test_export.py
compares them bit for bit). In torch because numpy's takes ~10x longer on a 135M-parameter model.
Reading them back is zoo/checkpoints.py's job (its fast dequantizers).
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


def bf16(t):
    """bfloat16 bits, rounded to nearest even as ggml (and torch) round them; NaN stays NaN."""
    return t.detach().to(torch.bfloat16).view(torch.uint8).view(*t.shape[:-1], -1)


QUANTIZERS = {"q8_0": q8_0, "q4_0": q4_0, "q4_1": q4_1}
