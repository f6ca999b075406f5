"""GGML's tensor types, read in torch: every block format llama.cpp writes by default, dequantized
bit-identically to `gguf.quants` (the gguf package's numpy reference), several times faster.

    dequantize(raw, qtype, shape)   # raw: the tensor's bytes (uint8) -> float32 [shape]; F16/BF16 as stored
    TYPES                           # {ggml type number: name} of what dequantize reads

Layouts (llama.cpp's ggml-common.h): the simple formats hold 32 weights per block with an fp16 scale d
(and minimum m): Q4_0 (q - 8) d, Q4_1 q d + m, Q5_0 (q - 16) d, Q5_1 q d + m, Q8_0 q d. The K-quants
hold 256 weights per super-block with fp16 d (and dmin) and a small integer scale (and minimum) per
sub-block of 16 or 32 weights: Q2_K, Q3_K and Q6_K w = d sc q (Q2_K minus dmin m), Q4_K and Q5_K
w = (d sc) q - (dmin m) on sub-blocks of 32. Every product is rounded as gguf.quants rounds it (float32,
the same operands in the same order), which is what makes the results bit-identical.
"""
import torch

TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
         12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
STORED = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # kept as stored: exact in any wider dtype


def dequantize(raw, qtype, shape):
    """The tensor of `shape` whose bytes (uint8, as the file stores them) are `raw`, in float32 (F16 and BF16
    as stored). Raises KeyError for a type outside TYPES (callers name the tensor)."""
    if qtype in STORED:
        return raw.view(STORED[qtype]).view(shape)
    return _DEQUANT[qtype](raw).view(shape)


def _f16(b):  # fp16 bytes [n, 2k] -> float32 [n, k]
    return b.contiguous().view(torch.float16).float()


def _bits(b, shifts, mask):
    """Bit fields of bytes b [n, g, 1, m]: (b >> s) & mask for each shift s -> [n, g, len(shifts), m]."""
    return (b >> torch.tensor(shifts, dtype=torch.uint8).view(1, 1, -1, 1)) & mask


CHUNK = 1 << 14  # blocks dequantized at a time where a tensor's intermediates would not fit in cache


def _blocks(raw, nbytes):
    return raw.view(-1, nbytes)


def q4_0(raw):  # d (fp16), 16 bytes of nibbles: weights 0-15 low, 16-31 high; (q - 8) d
    b = _blocks(raw, 18)
    q = _bits(b[:, None, None, 2:], (0, 4), 15).view(-1, 32)
    return _f16(b[:, :2]) * (q.to(torch.int8) - 8).float()


def q4_1(raw):  # d, m, nibbles; q d + m
    b = _blocks(raw, 20)
    q = _bits(b[:, None, None, 4:], (0, 4), 15).view(-1, 32).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def q5_codes(b, at):  # the 5-bit codes of Q5_0/Q5_1: 4 bytes of high bits at `at` (bit j: weight j), then nibbles
    qh = _bits(b[:, at:at + 4].reshape(-1, 4, 1, 1), tuple(range(8)), 1).view(-1, 32)  # byte-major: [n, 32]
    ql = _bits(b[:, None, None, at + 4:], (0, 4), 15).view(-1, 32)
    return ql | (qh << 4)


def q5_0(raw):  # d, qh, nibbles; (q - 16) d
    b = _blocks(raw, 22)
    return _f16(b[:, :2]) * (q5_codes(b, 2).to(torch.int8) - 16).float()


def q5_1(raw):  # d, m, qh, nibbles; q d + m
    b = _blocks(raw, 24)
    return _f16(b[:, :2]) * q5_codes(b, 4).float() + _f16(b[:, 2:4])


def q8_0(raw):  # d, 32 int8; q d
    b = _blocks(raw, 34)
    out = torch.empty(len(b), 32)
    for i in range(0, len(b), CHUNK):  # a chunk's float codes are still in cache when scaled: 2x faster, 168M weights
        c = b[i:i + CHUNK]
        torch.mul(c[:, 2:].view(torch.int8).float(), _f16(c[:, :2]), out=out[i:i + CHUNK])
    return out


def q2_k(raw):  # 16 scale bytes (low nibble sc, high m), 64 bytes of 2-bit q, d, dmin; d sc q - dmin m (16 each)
    b = _blocks(raw, 84)
    n, sc = b.shape[0], b[:, :16]
    dl = (_f16(b[:, 80:82]) * (sc & 15).float()).view(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (sc >> 4).float()).view(n, 16, 1)
    q = _bits(b[:, 16:80].view(n, 2, 1, 32), (0, 2, 4, 6), 3).view(n, 16, 16).float()
    return (dl * q - ml).view(n, 256)


def q3_k(raw):  # 32 bytes high-bit mask, 64 bytes 2-bit q, 12 bytes of 6-bit scales, d; d (sc - 32) q
    b = _blocks(raw, 110)
    n, scales = b.shape[0], b[:, 96:108]
    lo = _bits(scales[:, None, None, :8], (0, 4), 15).view(n, 16)
    hi = _bits(scales[:, None, None, 8:], (0, 2, 4, 6), 3).view(n, 16)
    sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b[:, 108:110]) * sc).view(n, 16, 1)
    ql = _bits(b[:, 32:96].view(n, 2, 1, 32), (0, 2, 4, 6), 3).view(n, 16, 16)
    qh = _bits(b[:, None, None, :32], tuple(range(8)), 1).view(n, 16, 16) ^ 1  # a set bit: no offset of -4
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).view(n, 256)


def k_scale_min(scales):
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit minimums -> (sc, m), uint8 [n, 8] each."""
    d, m, md = scales.view(-1, 3, 4).unbind(1)
    sc = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), 1)
    mn = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), 1)
    return sc, mn


def k_sub_blocks(b):
    """Q4_K/Q5_K's per-sub-block affine grid: (scale d sc, minimum dmin m), float32 [n, 8, 1] each."""
    n = b.shape[0]
    sc, mn = k_scale_min(b[:, 4:16])
    return (_f16(b[:, :2]) * sc.float()).view(n, 8, 1), (_f16(b[:, 2:4]) * mn.float()).view(n, 8, 1)


def q4_k_codes(b):  # the 4-bit codes [n, 8, 32]: each 32 bytes hold sub-block 2j (low nibbles) and 2j+1 (high)
    return _bits(b[:, 16:144].view(-1, 4, 1, 32), (0, 4), 15).view(-1, 8, 32)


def q5_k_codes(b):  # the 5-bit codes [n, 8, 32]: nibbles as Q4_K's, and bit j of 32 mask bytes for sub-block j
    qh = _bits(b[:, None, None, 16:48], tuple(range(8)), 1).view(-1, 8, 32)
    return _bits(b[:, 48:176].view(-1, 4, 1, 32), (0, 4), 15).view(-1, 8, 32) | (qh << 4)


def q4_k(raw):  # d, dmin, 12 scale bytes, 128 bytes of nibbles; (d sc) q - (dmin m) per 32
    b = _blocks(raw, 144)
    d, dm = k_sub_blocks(b)
    return (d * q4_k_codes(b).float() - dm).view(-1, 256)


def q5_k(raw):  # d, dmin, 12 scale bytes, 32 bytes high bits, 128 bytes of nibbles
    b = _blocks(raw, 176)
    d, dm = k_sub_blocks(b)
    return (d * q5_k_codes(b).float() - dm).view(-1, 256)


def q6_k_codes(b):
    """Q6_K's 6-bit codes q (uint8 [n, 16, 16], sub-block by sub-block) and scales d sc (float32 [n, 16, 1]): w = d sc
    (q - 32). 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, fp16 d."""
    n = b.shape[0]
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = _bits(b[:, :128].view(n, 2, 1, 64), (0, 4), 15).view(n, 8, 32)
    qh = _bits(b[:, 128:192].view(n, 2, 1, 32), (0, 2, 4, 6), 3).view(n, 8, 32)
    return (ql | (qh << 4)).view(n, 16, 16), d


def q6_k(raw):
    q, d = q6_k_codes(_blocks(raw, 210))
    return (d * (q.to(torch.int8) - 32).float()).view(-1, 256)


_DEQUANT = {2: q4_0, 3: q4_1, 6: q5_0, 7: q5_1, 8: q8_0, 10: q2_k, 11: q3_k, 12: q4_k, 13: q5_k, 14: q6_k}
