"""Weight-only quantization: int8 and int4 Linear and Embedding layers, and GGUF blocks kept packed.

    model = zoo.quantize(model, "int4", group_size=32)     # in place; activations stay bfloat16
    model = zoo.from_pretrained("model.Q4_1.gguf", quantize="native")   # the file's own 4-bit codes

Decoding one token reads every weight once, so its speed is set by the bytes of weights read: 16 bits
per weight in bfloat16, 8 in int8, 4 (+ 1 for the group scales and zero points) in int4. The matmuls
are PyTorch's own weight-only kernels: on the CPU `_weight_int8pack_mm` (int8, one scale per output
row; many rows at once, a prompt's or a training step's, take a GEMM over a transient dequantized copy
instead: `int8_mm`) and `_weight_int4pack_mm_for_cpu` (int4, groups of 32-256 weights along the input
with a scale and a zero point each; from INT4_GEMM_ROWS rows on, a dequantized copy's GEMM too, and
for a prompt's DENSE_ROWS rows or more a float copy that zoo/prepack.py keeps, where it keeps one); on CUDA
`_weight_int8pack_mm` and tinygemm's `_weight_int4pack_mm`. Where the zoo's own kernels build (x86 with AVX2) and
torch's int4 kernel packs a layout they read (its AVX2 and AVX-512 builds'), they take its rows instead, on the same
packed codes (zoo/kernels.py: int4_rows, and int8_rows for 8-bit layers and a tied head; Int4Linear.own_kernel).

One plain form describes every quantized matrix here (`Quantized`): unsigned codes u of `bits` bits,
and per group of `group_size` inputs a scale s and a zero point z, with

    w = (u - 2**(bits-1)) * s + z

which is the int4 kernels' formula. GGUF's blocks of 32 weights map onto it exactly: Q4_0 (q - 8) * d
is u = q, s = d, z = 0; Q4_1 q * d + m is u = q, s = d, z = m + 8 d; Q8_0 q * d is u = q + 128, s = d,
z = 0; the 5-bit Q5_0 (q - 16) d and Q5_1 q d + m as 8-bit codes u = q + 112 and u = q + 128. The K-quants'
sub-blocks of 32 are the same affine grid: Q4_K (d sc) q - dmin m is u = q, s = d sc, z = 8 s - dmin m,
and Q5_K u = q + 128, s = d sc, z = -dmin m. Only the block scales change, rounded to the activations'
dtype that the kernels take. Q6_K's sub-blocks of 16, d sc (q - 32), are u = q + 96, s = d sc, z = 0 in groups of 16:
kept where the zoo's own kernels multiply 8-bit codes row-major (rows_8bit), which take such groups, dequantized
elsewhere, as Q2_K and Q3_K are (sub-blocks of 16, narrower than torch's kernels' groups of 32); loading says so, per
type.

8-bit codes in groups (Q8_0, or int8 with a group size) have no torch kernel of their own; they run through the
int4 kernel as two 4-bit planes: u = 16 h + l, so w = 16 s (h - 8) + s (l - 8) + (8 s + z), one matmul
over the input repeated twice ([x, x] against [h | l]), exact, and still one byte per weight. Where the zoo's own
kernels run (zoo/kernels.py) they are kept row-major instead, u - 128 as int8, and multiplied by int8_rows: one
pass over x, and no planes.

The tied head and token embedding share their codes where the kernel's layout allows (int8 with one
scale per row); otherwise the embedding keeps its own row-major codes for the lookup (int4: an eighth of
the bfloat16 table each). A compiled one-row product (the decode step) of an 8-bit head in groups reads
those row-major codes instead of its two planes: inductor fuses the dequantization into the products'
sums, 1.06 bytes per weight where the planes take 1.25 (Gemma 3 270M's 262,144-row head: 9.6 ms, not 11-12).
Where the zoo's own kernels run, every product of such a head below the GEMM's rows reads them (int8_rows).

A quantized model generates, batches, beam-searches and compiles like any other; `save_pretrained`
refuses it (save the unquantized model and quantize when loading).
"""
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ggml_blocks, kernels
from .convert import unpermute
from .modes import in_prompt
from .models.moe import Experts

log = logging.getLogger("zoo")

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
# ggml types kept packed by quantize="native": those whose groups of 32 are an affine grid of codes (below)
GGUF_BLOCK_TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K"}
# and those whose groups of 16 are, kept where 8-bit codes are multiplied row-major (rows_8bit): torch's int4 kernel
# takes no groups of 16, the zoo's int8_rows does
GGUF_ROW_TYPES = {14: "Q6_K"}


# ---------------------------------------------------------------------------------------------------------
# The plain form


@dataclass
class Quantized:
    """A quantized [N, K] matrix in plain, row-major form: codes u [N, K] (uint8, values < 2**bits) and
    per group of `group_size` inputs a scale and a zero point [N, K / group_size] (float32);
    w = (u - 2**(bits-1)) * scale + zero. group_size == K: one group per row."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self):
        N, K = self.codes.shape
        u = self.codes.float().view(N, K // self.group_size, self.group_size)
        return ((u - 2 ** (self.bits - 1)) * self.scale[..., None] + self.zero[..., None]).view(N, K)

    @staticmethod
    def cat(parts):
        """Row-wise concatenation (fused q|k|v, gate|up), codes and their scales alike."""
        if len({(p.bits, p.group_size) for p in parts}) != 1:
            raise ValueError("cannot concatenate quantized matrices of different bits or group sizes")
        return Quantized(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                         torch.cat([p.zero for p in parts]), parts[0].bits, parts[0].group_size)

    def regrouped(self, group_size):
        """The same matrix in groups of `group_size`, a divisor of self.group_size: each scale and zero repeated
        (exact)."""
        n = self.group_size // group_size
        return Quantized(self.codes, self.scale.repeat_interleave(n, 1), self.zero.repeat_interleave(n, 1), self.bits,
                         group_size)

    def widened(self, bits):
        """The same matrix with codes of `bits` >= self.bits: u + 2**(bits-1) - 2**(self.bits-1), exact."""
        shift = 2 ** (bits - 1) - 2 ** (self.bits - 1)
        codes = self.codes if shift == 0 else self.codes + shift  # uint8: u + shift < 2**bits
        return Quantized(codes, self.scale, self.zero, bits, self.group_size)

    def rows(self, fn):
        """The same matrix with `fn` (a permutation of rows, e.g. convert.unpermute) applied to its rows."""
        return Quantized(fn(self.codes), fn(self.scale), fn(self.zero), self.bits, self.group_size)


def signed(u):
    """8-bit codes u (uint8) as u - 128 in int8: the same bytes with their sign bit flipped, no wider copy."""
    return (u ^ 128).view(torch.int8)


def quantize_tensor(w, bits, group_size):
    """w [N, K] (float) -> Quantized: int4 asymmetric (min and max of each group map to codes 0 and 15,
    as gpt-fast's), int8 symmetric (the largest magnitude of each group maps to +-127)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"group_size {group_size} does not divide the matrix's {K} columns")
    # contiguous: a column-major weight (generation.weights_column_major leaves fp32 ones so) would otherwise give
    # column-major codes, which the kernels refuse
    g = w.detach().float().contiguous().reshape(N, K // group_size, group_size)
    if bits == 4:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        u = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15)
        zero = lo + 8 * scale
    else:
        scale = (g.abs().amax(-1) / 127).clamp(min=1e-12)
        u = (g / scale[..., None]).round_().clamp_(-127, 127).add_(128)
        zero = torch.zeros_like(scale)
    return Quantized(u.to(torch.uint8).view(N, K), scale, zero, bits, group_size)


def from_gguf_blocks(qtype, raw, shape):
    """A GGUF tensor's raw blocks (uint8 bytes) of a type in GGUF_BLOCK_TYPES -> Quantized with groups of 32,
    the codes exactly the file's (see the module's docstring for the mapping). 5-bit codes are stored as
    8-bit ones (run as two 4-bit planes); Q4_K and Q5_K's groups are their sub-blocks of 32, whose scale
    d * sc and minimum dmin * m (w = scale q - minimum) are computed as dequantization computes them. Q6_K (of
    GGUF_ROW_TYPES): 8-bit codes in groups of 16."""
    N, K = shape
    g = K // 32

    def grid(u, bits, d, zero, group=32):
        return Quantized(u.reshape(N, K), d.reshape(N, K // group), zero.reshape(N, K // group), bits, group)

    if qtype == 14:  # Q6_K: d sc (q - 32) per sub-block of 16: u = q + 96
        q, d = ggml_blocks.q6_k_codes(raw.view(-1, 210))
        return grid(q + 96, 8, d, torch.zeros_like(d), 16)  # (uint8: 6-bit codes + 96 stay below 256)

    if qtype in (12, 13):  # Q4_K, Q5_K: w = d q - m per sub-block of 32
        b = raw.view(-1, 144 if qtype == 12 else 176)
        d, m = (t.reshape(-1) for t in ggml_blocks.k_sub_blocks(b))
        if qtype == 12:
            return grid(ggml_blocks.q4_k_codes(b), 4, d, 8 * d - m)
        return grid(ggml_blocks.q5_k_codes(b) + 128, 8, d, -m)  # (uint8: 5-bit codes + 128 stay below 256)
    if qtype in (6, 7):  # Q5_0 (q - 16) d: u = q + 112; Q5_1 q d + m: u = q + 128
        b = raw.view(-1, 22 if qtype == 6 else 24)
        at = 2 if qtype == 6 else 4
        u = ggml_blocks.q5_codes(b, at) + (112 if qtype == 6 else 128)  # uint8, as above
        dm = b[:, :at].contiguous().view(torch.float16).float()
        zero = dm[:, 1] if qtype == 7 else torch.zeros_like(dm[:, 0])
        return grid(u, 8, dm[:, 0], zero)
    if qtype == 8:  # Q8_0: fp16 d, 32 int8 q; w = q * d
        blocks = raw.view(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()[:, 0]
        u = blocks[:, 2:] ^ 128  # q + 128 of the int8 bytes: their sign bit flipped (as `signed` undoes)
        return grid(u, 8, d, torch.zeros_like(d))
    head = {2: 2, 3: 4}[qtype]  # Q4_0: fp16 d; Q4_1: fp16 d, fp16 m
    blocks = raw.view(-1, head + 16)
    dm = blocks[:, :head].contiguous().view(torch.float16).float()
    qs = blocks[:, head:]
    u = torch.stack((qs & 15, qs >> 4), 1)  # low nibbles are weights 0-15 of the block, high ones 16-31
    d = dm[:, 0]
    zero = dm[:, 1] + 8 * d if qtype == 3 else torch.zeros_like(d)
    return grid(u, 4, d, zero)


# ---------------------------------------------------------------------------------------------------------
# Modules


GEMM_ROWS = 128  # from this many rows of x on, a GEMM over a dequantized copy is faster than the int8 kernel
# and than the int4 kernel from this many (2 EPYC cores, bf16: level at 128 rows, 2-2.5x faster at 512)
INT4_GEMM_ROWS = 256
# from this many rows on, a layer holding a float copy of W (Int4Linear.dense) multiplies a prompt's rows by it instead
# of running the kernel (zoo/modes.py: prompt_mode; Gemma 3 270M's Q5_0 layers in planes, 2 EPYC cores: level at ~4
# rows, 4x faster at 32)
DENSE_ROWS = 4
# whether torch's CPU int8 kernel is the faster way for float32 activations: not in its AVX2 build, which multiplies
# them in a reference loop (int8_kernel_takes; other builds unmeasured keep it): a constant, not a call, for the
# compiled code that reads it
FLOAT32_INT8_KERNEL = torch.backends.cpu.get_cpu_capability() != "AVX2"
PACK_ROWS = 4096  # rows packed for the CPU int4 kernel at a time (a multiple of its blocks of 64)
# How inductor's loop over a tied head's row-major 8-bit codes (Int4Linear.row_product, compiled one-row steps) reads
# them at near this CPU's bandwidth, or None where the planes' kernel is the faster: "bytes" with AVX-512, 16 codes a
# load (~26 GB/s for Gemma 3's head on an EPYC); "words" with AVX2, whose loops load 8 bytes through a buffer
# (Vectorized<int8_t>::loadu(ptr, count): 1.2-2.5 GB/s, Gemma 3's compiled decoding 10.5 tok/s against 19.1 eager)
# but a float32 word, four codes, at full width (SmolLM2's head, one row: 3.0 ms against the planes' kernel's 5.0 on
# an AVX2-only EPYC). A constant, not a call, for the compiled code that reads it.
ROW_LOOP_FORM = {"AVX512": "bytes", "AVX2": "words"}.get(torch.backends.cpu.get_cpu_capability())


def int8_mm(x, codes, scales):
    """x [M, K] @ (codes [N, K] * scales[:, None])^T in x's dtype (x and scales of one dtype). Torch's int8
    kernel reads each weight once, as a decode step wants, but its time grows with M: for a prompt's rows,
    a scored text's or a training step's, a transient dequantized copy of the weight goes through a GEMM
    instead (bench/int8_matmul.py, 2 cores, SmolLM2's layers: at 128 rows 4x faster in bf16 with AMX, 1.5x
    in float32; at 2,048 rows 12-16x and 2x). The copy lives for the product only. The kernel also reads K
    in blocks of 16 and crashes on other sizes (torch 2.13, CPU): those always take the copy."""
    if int8_kernel_takes(x, codes.shape[1]):
        return torch.ops.aten._weight_int8pack_mm(x, codes, scales)
    return dequantized_mm(x, codes, scales[:, None])


def int8_kernel_takes(x, K):
    """Whether torch's int8 kernel computes x [M, K] @ W^T faster than the dequantized copy's GEMM: for fewer than
    GEMM_ROWS rows, of K in blocks of 16 (see int8_mm), and not float32 with torch's AVX2 build of the kernel,
    which multiplies float32 in a reference loop: slower than the copy's GEMM from the first row there
    (`python bench/int8_matmul.py --dtype float32` on an AVX2-only EPYC, SmolLM2's gate|up layer: 1 row 0.86 against
    0.47 ms, 16 rows 24.7 against 1.5)."""
    return x.shape[0] < GEMM_ROWS and K % 16 == 0 and (x.dtype != torch.float32 or x.device.type != "cpu"
                                                       or FLOAT32_INT8_KERNEL)


def dequantized_mm(x, codes, scales):
    """x [M, K] @ (codes * scales)^T, codes int8 [N, K], scales broadcasting to them; the output in x's dtype."""
    # the weight as x's dtype holds it, then (where gemm_dtype widens) in float32: the same products either way
    w = codes.to(x.dtype).mul_(scales.to(x.dtype)).to(gemm_dtype(x))
    return F.linear(x.to(w.dtype), w).to(x.dtype)


def gemm_dtype(x):
    """The dtype of a GEMM of x over a dequantized weight: x's, but float32 for bf16 on a CPU without bf16
    arithmetic (the same products, exact in float32, and accumulated in float32 as a bf16 GEMM does; torch
    emulates bf16 GEMMs there, 3-4x slower)."""
    return torch.float32 if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bf16() else x.dtype


@functools.cache
def native_bf16():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without, torch emulates bf16 GEMMs,
    measured 3-4x slower than float32 ones on an AVX-512 EPYC without BF16."""
    return any(getattr(torch.cpu, f, lambda: True)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


class _Int8Matmul(torch.autograd.Function):
    """int8_mm with a backward to the input, which torch's int8 kernel lacks (the weights are frozen): LoRA
    over an int8 base needs the gradient to pass through the base to the adapters below."""

    @staticmethod
    def forward(ctx, x, codes, scales):
        ctx.save_for_backward(codes, scales)
        return int8_mm(x, codes, scales)  # [M, N]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        codes, scales = ctx.saved_tensors
        # dx = grad (codes * scales[:, None]); the kernel's K is N here (codes transposed), hence the % 16
        if not int8_kernel_takes(grad, codes.shape[0]):
            return dequantized_mm(grad, codes.t(), scales), None, None
        # the kernel again, on codes^T [K, N] (a transient int8 copy) with unit scales; the kernel takes the
        # activations' dtype, so grad arrives in it
        ones = torch.ones(codes.shape[1], dtype=grad.dtype, device=grad.device)
        return int8_mm((grad * scales).contiguous(), codes.t().contiguous(), ones), None, None


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W int8 [N, K] and one scale per output row: torch's _weight_int8pack_mm for a few
    rows of x, a dequantized copy's GEMM for many (int8_mm); differentiable with respect to x."""

    def __init__(self, codes, scales, bias=None):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.register_buffer("codes", codes)  # int8 [N, K]
        self.register_buffer("scales", scales)  # [N], the activations' dtype
        self.register_buffer("bias", bias)

    @property
    def weight(self):
        """What the model files read from `.weight` outside the matmul: the dtype (their activations') and
        device. The values are in `codes` and `scales`."""
        return self.scales

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, one scale per row"

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)  # [M, K]: the kernel computes in the scales'
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _Int8Matmul.apply(x2, self.codes, self.scales)
        else:
            y = int8_mm(x2, self.codes, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)  # [..., N]
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x W^T (+ b) through the int4 kernels, W packed in the kernel's layout with group-wise scales and
    zero points [K / group_size, N, 2]. planes=2 holds 8-bit codes as two 4-bit planes (see the module's
    docstring): the kernel then runs over [x, x]; where the zoo's own kernels run (own_kernel), 8-bit codes are kept
    row-major instead (row_codes, row_scales, row_zeros; no packed, no scales_and_zeros) for int8_rows. Which form a
    layer takes is decided when it is built, on this machine: its buffers are not a portable checkpoint (nor are the
    packed codes, whose layout is the CPU build's; save_pretrained refuses quantized models)."""

    def __init__(self, q: Quantized, dtype, bias=None):
        super().__init__()
        N, K = q.codes.shape
        self.in_features, self.out_features, self.group_size = K, N, q.group_size
        self.planes = 2 if q.bits == 8 else 1

        def codes(rows):  # the 4-bit codes the kernel takes for these rows: [rows, K], or the two planes [rows, 2K]
            c = q.codes[rows]
            return torch.cat((c >> 4, c & 15), 1) if q.bits == 8 else c
        self.device_type = q.codes.device.type
        # the zoo's own kernels for the rows torch's kernel would take, where it reads their layouts (zoo/kernels.py)
        # 8-bit codes there are kept row-major for int8_rows (a byte a weight, one pass over x: no planes)
        row_major = q.bits == 8 and rows_8bit(q.codes.device)
        self.block_rows = packed_block_rows() if self.device_type == "cpu" else None  # (torch's CPU layout)
        self.own_kernel = row_major or self.block_rows is not None and N % self.block_rows == 0 and \
            kernels.int4_rows() is not None
        if row_major:
            packed = None
        elif self.device_type == "cuda":
            u = codes(slice(None))
            tiles = next(t for t in (8, 4, 2, 1) if u.shape[1] % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), tiles)
        else:  # in blocks of rows (the kernel packs each 64 apart), so that its int32 input, 4 bytes a code, is never
            # the whole matrix's: Gemma 3's 262,144-row head in planes took 1.3 GB that way, most of loading's peak
            packed = torch.empty(N, K * self.planes // 2, dtype=torch.uint8, device=q.codes.device)  # 2 codes a byte
            for i in range(0, N, PACK_ROWS):
                packed[i:i + PACK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    codes(slice(i, i + PACK_ROWS)).int(), 1)
        self.register_buffer("packed", packed)
        if row_major:
            scale = zero = None
        elif q.bits == 8:  # the two planes': w = 16 s (h - 8) + s (l - 8) + (8 s + z)
            scale = torch.cat((16 * q.scale, q.scale), 1)
            zero = torch.cat((torch.zeros_like(q.zero), 8 * q.scale + q.zero), 1)
        else:
            scale, zero = q.scale, q.zero
        self.register_buffer("scales_and_zeros", None if row_major else torch.stack(
            (scale.to(dtype), zero.to(dtype)), -1).transpose(0, 1).contiguous())
        self.register_buffer("bias", bias)
        # 8-bit codes row-major (u - 128), a scale and a zero point (None: all zeros) per group: this layer's own
        # (row_major), or a tied embedding's, shared (_share_rows)
        self.register_buffer("row_codes", signed(q.codes.contiguous()) if row_major else None, persistent=row_major)
        self.register_buffer("row_scales", q.scale.to(dtype) if row_major else None, persistent=row_major)
        self.register_buffer("row_zeros", q.zero.to(dtype) if row_major and q.zero.any() else None,
                             persistent=row_major)
        self.dense = None  # a module computing the same product from a float copy of W (zoo/prepack.py sets it)

    @property
    def weight(self):
        """The activations' dtype and device, for the model files that read them from `.weight`."""
        return self.row_scales if self.scales_and_zeros is None else self.scales_and_zeros

    def extra_repr(self):
        form = "int4" if self.planes == 1 else "int8 as two int4 planes" if self.packed is not None else \
            "int8, row-major"
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}, group_size={self.group_size}"

    def forward(self, x):
        x2, cpu = x.reshape(-1, self.in_features), self.device_type == "cpu"
        own = self.own_kernel and x2.dtype in (torch.bfloat16, torch.float32) and \
            x2.dtype == self.weight.dtype  # (the zoo's kernels take these; torch's float16 too)
        if self.row_codes is not None and x2.shape[0] == 1 and cpu and torch.compiler.is_compiling() \
                and not torch.is_grad_enabled() and ROW_LOOP_FORM and not own:  # (materialize has no backward)
            y = self.row_product(x2).to(x2.dtype)
        elif x2.shape[0] >= DENSE_ROWS and not torch.compiler.is_compiling() and self.dense is not None \
                and in_prompt():  # (compiled code cannot trace oneDNN's weights)
            y = self.dense(x2)
        elif (x2.shape[0] >= INT4_GEMM_ROWS or torch.is_grad_enabled() and x2.requires_grad or
              self.packed is None and not own) and self.dequantizable():
            # many rows (a long prompt, a scored text), or a gradient to pass back (LoRA below an int4 head), which
            # the kernels lack, or row-major codes and activations int8_rows does not take (float16): a GEMM over a
            # transient dequantized copy, as int8_mm
            dtype = gemm_dtype(x2)  # (the weight rounded to x's dtype first, as dequantized_mm rounds it)
            y = F.linear(x2.to(dtype), self.dequantized().to(x2.dtype).to(dtype)).to(x2.dtype)
        elif own and self.row_codes is not None and self.row_scales.dtype == x2.dtype and \
                (self.row_zeros is None or self.row_zeros.dtype == x2.dtype):
            # 8-bit codes row-major: this layer's, or a tied head's embedding's; a byte a weight
            y = torch.ops.zoo_kernels.int8_rows(x2, self.row_codes, self.row_scales, self.row_zeros)
        else:  # the kernel: over [x, x] for two planes
            args = (torch.cat((x2, x2), 1) if self.planes == 2 else x2, self.packed, self.group_size,
                    self.scales_and_zeros)
            if self.device_type == "cuda":  # (as packed in __init__)
                y = torch.ops.aten._weight_int4pack_mm(*args)
            elif own:
                y = torch.ops.zoo_kernels.int4_rows(*args, self.block_rows)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(*args)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantizable(self):
        """Whether `dequantized` can read the codes: row-major ones, or packed in a CPU kernel's layout that
        packed_block_rows knows (block_rows), whose blocks of rows divide the layer's."""
        if self.packed is None:
            return True
        return self.block_rows is not None and self.out_features % self.block_rows == 0

    def dequantized(self):
        """W [N, K] in float32: from the row-major 8-bit codes where the layer keeps those alone, else from the packed
        codes in the CPU kernel's layout (for each block of R rows and each input, R / 2 bytes: rows i and i + R / 2
        in the low and high nibbles; block_rows), the two planes summed."""
        if self.packed is None:
            N, G = self.row_scales.shape
            w = self.row_codes.float().view(N, G, -1) * self.row_scales.float()[..., None]
            return (w if self.row_zeros is None else w + self.row_zeros.float()[..., None]).view(N, -1)
        N, K2, R = self.out_features, self.packed.shape[1] * 2, self.block_rows
        b = self.packed.view(N // R, K2, R // 2)
        u = torch.cat((b & 15, b >> 4), -1).transpose(1, 2).reshape(N, K2 // self.group_size, self.group_size)
        scale, zero = self.scales_and_zeros.float().permute(2, 1, 0)[..., None]  # [N, K2 / group, 1] each
        w = (u.float() - 8).mul_(scale).add_(zero).view(N, K2)
        return w if self.planes == 1 else w[:, :K2 // 2] + w[:, K2 // 2:]

    def row_product(self, x):
        """x [1, K] @ W^T from the shared row-major codes, in float32, written as the sums that inductor compiles
        into one loop over the codes (eagerly, this would materialise W in float32: compiled steps only).
        y_n = sum_g s_ng sum_j c_ngj x_gj (+ sum_g z_ng sum_j x_gj): each weight read once, as one byte; on AVX2,
        four bytes at a time (ROW_LOOP_FORM)."""
        N, G = self.row_scales.shape
        group = self.in_features // G
        if ROW_LOOP_FORM == "words" and group % 4 == 0:
            # each 32-bit word holds codes 4j..4j+3 of its row (little-endian); read as float32 it loads at full
            # width, then shifts apart: byte b of word j, sign-extended, is code 4j + b
            words = self.row_codes.view(torch.float32).view(torch.int32).view(N, G, 1, group // 4)
            shift = torch.arange(24, -1, -8, dtype=torch.int32, device=words.device).view(4, 1)
            c = (words << shift) >> 24  # [N, G, 4, group / 4]
            x = materialize(x.float().view(G, group // 4, 4).transpose(1, 2).contiguous())  # [G, 4, group / 4]
            y = ((c.float() * x).sum((2, 3)) * self.row_scales.float()).sum(-1)  # [N]: a group's sum, then its scale
            x = x.flatten(1)  # [G, group] (in the codes' order)
        else:
            x = materialize(x.float()).view(1, G, -1)  # [1, G, group]
            y = (self.row_codes.view(N, G, -1).float() * x * self.row_scales[..., None].float()).sum((1, 2))  # [N]
        return y if self.row_zeros is None else y + (self.row_zeros.float() * x.sum(-1)).sum(-1)


@torch.library.custom_op("zoo::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy of x that inductor cannot see into, so that x is computed once, into a buffer: without it,
    inductor inlines x's producers (the final norm, the residual sum) into the loop of the product that
    reads it, recomputing them for each of the head's rows (measured: Gemma's decoding 2x slower)."""
    return x.clone()


@materialize.register_fake
def _(x):
    return torch.empty_like(x)


@functools.cache
def packed_block_rows():
    """The rows R of the blocks this CPU's int4 kernel packs codes in, as Int4Linear.dequantized reads them (for each
    block and input, R / 2 bytes holding rows i and i + R / 2 in their low and high nibbles): 64 in its AVX-512
    build, 32 in its AVX2 one; None for a layout it does not know (such a CPU keeps the kernel for every row count).
    Checked once, on a random 64 x 64 matrix."""
    u = torch.randint(0, 16, (64, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    for rows in (64, 32):
        b = packed.view(64 // rows, 64, rows // 2)
        if torch.equal(torch.cat((b & 15, b >> 4), -1).transpose(1, 2).reshape(64, 64).int(), u):
            return rows
    return None


def rows_8bit(device):
    """Whether an Int4Linear of 8-bit codes built on `device` keeps them row-major for the zoo's int8_rows (where its
    own kernels run): then any number of rows, and groups of 16 (Q6_K's), work too."""
    return torch.device(device).type == "cpu" and kernels.int8_rows() is not None


class QuantEmbedding(nn.Module):
    """A token embedding looked up from quantized rows: each looked-up row is dequantized alone.
    codes: int8 [V, D] (8 bits, u - 128) or uint8 [V, D / 2] (4 bits, two per byte: low nibble first)."""

    def __init__(self, codes, scales, zeros, bits, group_size):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.embedding_dim = codes.shape[1] * (2 if bits == 4 else 1)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)  # [V, D / group_size], the activations' dtype
        self.register_buffer("zeros", zeros)  # same, or None (symmetric)

    @classmethod
    def from_quantized(cls, q: Quantized, dtype):
        if q.bits == 8:
            codes = signed(q.codes)
        else:
            codes = q.codes[:, 0::2] | q.codes[:, 1::2] << 4
        zeros = None if q.bits == 8 and not q.zero.any() else q.zero.to(dtype)
        return cls(codes, q.scale.to(dtype), zeros, q.bits, q.group_size)

    @property
    def weight(self):
        """The activations' dtype and device, for the model files that read them from `.weight`."""
        return self.scales

    def extra_repr(self):
        return f"{self.codes.shape[0]}, {self.embedding_dim}, int{self.bits}, group_size={self.group_size}"

    def forward(self, idx):
        c = self.codes[idx]
        if self.bits == 4:
            c = torch.stack((c & 15, c >> 4), -1).flatten(-2).to(self.scales.dtype) - 8
        else:
            c = c.to(self.scales.dtype)
        groups = self.embedding_dim // self.group_size
        w = c.unflatten(-1, (groups, self.group_size)) * self.scales[idx][..., None]
        if self.zeros is not None:
            w = w + self.zeros[idx][..., None]
        return w.flatten(-2)


class QuantExperts(Experts):
    """A mixture of experts' stacked experts (models/moe.py's Experts) with each expert's two matrices quantized
    alone, as zoo.quantize quantizes a linear layer (int8: one scale per output row; int4: groups along the
    input): gate_up_proj and down_proj become lists of E Int8Linear or Int4Linear modules. The model file's
    grouping of tokens by expert is kept, so a decoding step reads the codes of its k experts alone; compiled,
    that grouping's per-expert counts (.tolist()) are a graph break, as the E modules cannot be gathered as the
    float stacks are. (Loaded with quantize="native", one of the two may stay a float stack [E, out, in] where
    the file's type has no packed form.)"""

    def __init__(self, gate_up_proj, down_proj):
        nn.Module.__init__(self)  # not Experts': no float stacks to allocate
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def expert_weights(self):
        return [w.unbind() if isinstance(w, torch.Tensor) else w for w in (self.gate_up_proj, self.down_proj)]

    def expert(self, x, gate_up_proj, down_proj):
        gate, up = expert_project(gate_up_proj, x).chunk(2, dim=-1)  # [n, F] each
        return expert_project(down_proj, F.silu(gate) * up)  # [n, D]

    def extra_repr(self):
        return f"{len(self.expert_weights()[0])} experts, each quantized alone"


def expert_project(w, x):
    """x [n, in] through one expert's matrix: a quantized module, or a float tensor [out, in]."""
    return w(x) if isinstance(w, nn.Module) else x @ w.mT


def linear_from(q: Quantized, dtype, bias=None):
    """The fastest module for a quantized matrix: the int8 kernel for 8 bits with one (symmetric) scale
    per row, the int4 kernel (one or two planes) otherwise."""
    if q.bits == 8 and q.group_size == q.codes.shape[1] and not q.zero.any():
        return Int8Linear(signed(q.codes), q.scale[:, 0].to(dtype), bias)
    return Int4Linear(q, dtype, bias)


# ---------------------------------------------------------------------------------------------------------
# zoo.quantize


def check_mode(mode, group_size=None):
    """The group size a mode uses (int4: 32 by default; int8: None, one scale per row); ValueError for
    an unknown mode or a group size the kernels cannot take."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: use one of {', '.join(MODES)} "
                         f"(or 'native' when loading a GGUF file)")
    if mode == "int4" and group_size is None:
        group_size = 32
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} (the int4 kernels' "
                         f"sizes){'' if mode == 'int4' else ', or None for one int8 scale per output row'}; "
                         f"got {group_size}")
    return group_size


def quantize(model, mode, group_size=None, *, head="int8", embeddings="int8", dtype=None):
    """Replace `model`'s Linear layers with weight-only quantized ones, in place; returns the model. A mixture
    of experts' stacked experts (models/moe.py) are quantized in `mode` too, each expert alone (QuantExperts).

    mode: "int8" (symmetric, one scale per output row, or per group of `group_size` inputs) or "int4"
    (asymmetric groups of `group_size` inputs, default 32). head (the output layer) and embeddings
    (nn.Embedding layers): "int8" (the default: one scale per row, one set of codes shared by a tied
    head and embedding), "int4" (groups of `group_size`), or None to keep them as they are. The head
    defaults to int8 even in int4 mode: it is a quarter of a small model's weights, and in 4 bits it
    alone changes the top-1 token of one position in six (SmolLM2-135M; README: Quantized inference).
    Activations, norms and biases use `dtype` (default bfloat16: torch's int4 kernel has no fast float32
    path; the zoo's own kernels have, zoo/kernels.py). Raises ValueError, changing nothing, for an
    unknown mode or a group size that does not divide a layer's inputs.
    """
    group_size = check_mode(mode, group_size)
    if is_quantized(model):  # (its quantized layers would be left as they are, silently)
        raise ValueError("the model is quantized already: quantize the unquantized model (load it again)")
    for option, value in (("head", head), ("embeddings", embeddings)):
        if value not in (*MODES, None):
            raise ValueError(f"{option} must be 'int8', 'int4' or None (unquantized), not {value!r}")
    dtype = dtype or torch.bfloat16
    out_layer = output_layer(model)
    chosen = {}  # name -> (module, bits, group size or None for one group per row)
    experts = {}  # name -> a mixture's stacked experts (models/moe.py), quantized per expert in `mode`
    # a mixture's routers (the gates beside the experts) choose the experts: a few rows, kept unquantized (as
    # llama.cpp keeps ffn_gate_inp in float32)
    routers = {id(r) for m in model.modules() if type(getattr(m, "experts", None)) is Experts
               for r in m.children() if isinstance(r, nn.Linear)}
    for name, m in model.named_modules():
        kind = None if id(m) in routers else (head if m is out_layer else mode) if isinstance(m, nn.Linear) else \
            embeddings if isinstance(m, nn.Embedding) else None
        if kind is not None:
            chosen[name] = (m, 8 if kind == "int8" else 4, group_size if kind == mode else check_mode(kind))
        elif type(m) is Experts:
            experts[name] = m
    matrices = [(name, w.shape, 8 if mode == "int8" else 4, group_size) for e, m in experts.items()
                for name, w in ((f"{e}.gate_up_proj", m.gate_up_proj[0]), (f"{e}.down_proj", m.down_proj[0]))]
    matrices += [(name, m.weight.shape, bits, group) for name, (m, bits, group) in chosen.items()]

    def ways(name):  # what the caller can change for a layer that cannot take its settings
        m = chosen.get(name, (None,))[0]
        option = "head" if m is out_layer else "embeddings" if isinstance(m, nn.Embedding) else None
        if option:
            return f"{option}='int8' (one scale a row, the default) or {option}=None (unquantized) fits it"
        return "int8 with group_size=None (one scale a row) fits any layer"
    for name, (rows, cols), bits, group in matrices:  # check everything before changing anything
        if group is not None and cols % group:
            fits = [str(g) for g in GROUP_SIZES if cols % g == 0]
            raise ValueError(f"group_size {group} does not divide {name}'s {cols} inputs: "
                             + (f"group_size {' or '.join(fits)} does; " if fits else "no group size does; ")
                             + ways(name))
        if not isinstance(chosen.get(name, (None,))[0], nn.Embedding) and group is not None and rows % 16:
            raise ValueError(f"{name} has {rows} outputs; the int4 kernel needs a multiple of 16: {ways(name)}")
    for p in model.parameters():  # norms and biases in the activations' dtype
        p.data = p.data.to(dtype)
    done = {}  # (id(weight), bits, group) -> Quantized: a tied head and embedding are quantized once
    for name, (m, bits, group) in chosen.items():
        w = m.weight
        key = (id(w), bits, group)
        if key not in done:
            done[key] = quantize_tensor(w, bits, group or w.shape[1])
        _replace(model, name, _module_for(m, done[key], dtype, done))
    for name, m in experts.items():  # E quantized linear modules per stack, each expert's rows alone
        _replace(model, name, QuantExperts(*(nn.ModuleList(
            linear_from(quantize_tensor(w, 8 if mode == "int8" else 4, group_size or w.shape[1]), dtype)
            for w in stack) for stack in (m.gate_up_proj, m.down_proj))))
    return model


def _module_for(old, q, dtype, shared):
    """The quantized module that stands for `old` (Linear or Embedding); tied int8 rows share codes."""
    key = ("module", id(q))
    if isinstance(old, nn.Embedding):
        emb = QuantEmbedding.from_quantized(q, dtype)
        partner = shared.get(key)
        if isinstance(partner, Int8Linear):  # tied to an int8 head: one set of codes for both
            emb.codes, emb.scales = partner.codes, partner.scales[:, None]
        _share_rows(partner, emb)
        shared.setdefault(key, emb)
        return emb
    bias = None if old.bias is None else old.bias.detach().to(dtype)
    lin = linear_from(q, dtype, bias)
    partner = shared.get(key)
    if isinstance(lin, Int8Linear) and isinstance(partner, QuantEmbedding):
        partner.codes, partner.scales = lin.codes, lin.scales[:, None]
    _share_rows(lin, partner)
    shared.setdefault(key, lin)
    return lin


def _share_rows(head, embedding):
    """A tied head of 8-bit codes in planes takes its embedding's row-major codes, scales and zero points (the same
    tensors, no copy) for compiled one-row products (Int4Linear.row_product), or for every product below the GEMM's
    rows where the zoo's own kernels run (zoo/kernels.py: int8_rows). Shared as built: a later .to()
    converts each module's buffers apart (the values stay equal)."""
    if isinstance(head, Int4Linear) and head.planes == 2 and isinstance(embedding, QuantEmbedding) \
            and embedding.bits == 8 and embedding.group_size == head.group_size:
        head.row_codes, head.row_scales, head.row_zeros = embedding.codes, embedding.scales, embedding.zeros


def output_layer(model):
    """The model's output layer (the model files' contract names it lm_head), or None."""
    return getattr(model, "lm_head", None)


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def is_quantized(model):
    return any(isinstance(m, (Int8Linear, Int4Linear, QuantEmbedding)) for m in model.modules())


def describe(model):
    """A one-line summary: how many layers of each kind, and the bytes the weights take."""
    kinds = {}
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear, QuantEmbedding)):
            k = type(m).__name__ + ("" if getattr(m, "planes", 1) == 1 else
                                    "(8-bit planes)" if m.packed is not None else "(8-bit, row-major)")
            kinds[k] = kinds.get(k, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items()) + f"; {weight_bytes(model) / 2**20:.1f} MiB of weights"


def weight_bytes(model):
    """Bytes of every distinct parameter and persistent buffer (shared tensors once; oneDNN's reordered weights,
    zoo/prepack.py's, have no storage to share, and count by their elements)."""
    seen = {}
    for t in model.state_dict().values():
        if t.is_mkldnn:
            seen[id(t)] = t.numel() * t.element_size()
        else:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------
# Loading GGUF blocks packed (from_pretrained(gguf, quantize="native"))


def gguf_packed_loader(model, ckpt, *, device, dtype):
    """The hook that convert.load_weights calls for each of our tensors: where every checkpoint tensor it
    is made of is stored in GGUF_BLOCK_TYPES blocks, it builds the quantized modules (Linear, and the
    token embedding) from the blocks as they are, and returns True; else False (loaded as usual). Its
    `summary()` says, per ggml type, how many matrices were kept packed and how many dequantized."""
    kept, dequantized = {}, {}

    def load(names, parts):
        modules = [model.get_submodule(n.rpartition(".")[0]) for n in names]
        stacked = isinstance(modules[0], Experts)  # a mixture's experts, [E, rows, cols] per part
        if any("transpose" in p or "add" in p for p in parts) or stacked and any(p.get("unpermute") for p in parts) \
                or not (stacked or all(isinstance(m, (nn.Linear, nn.Embedding)) for m in modules)):
            return False
        types = [ckpt.raw_type(p["from"]) for p in parts]
        packable = {**GGUF_BLOCK_TYPES, **(GGUF_ROW_TYPES if rows_8bit(device) else {})}
        tally = kept if all(t in packable for t in types) else dequantized
        for t in types:
            tally[t] = tally.get(t, 0) + 1
        if tally is dequantized:
            return False
        pieces = []  # per part, its matrices (one; E for stacked experts)
        for p in parts:
            qtype, raw, shape = ckpt.read_raw(p["from"])
            q = from_gguf_blocks(qtype, raw, (-1, shape[-1]) if stacked else shape)
            if p.get("unpermute"):
                q = q.rows(lambda t, n=p["unpermute"]: unpermute(t, n))
            pieces.append([q.rows(lambda t, e=e: t.view(shape[0], -1, t.shape[-1])[e]) for e in range(shape[0])]
                          if stacked else [q])
        matrices = []
        for group in zip(*pieces):  # one matrix's parts
            bits = max(q.bits for q in group)  # a fused matrix of 4- and 8-bit parts (Q4_K q, Q8_0 v): 8-bit codes
            size = min(q.group_size for q in group)  # (and of groups of 32 and 16: groups of 16)
            q = group[0] if len(group) == 1 else Quantized.cat([q.widened(bits).regrouped(size) for q in group])
            matrices.append(Quantized(q.codes.to(device), q.scale.to(device), q.zero.to(device), q.bits, q.group_size))
        if stacked:  # E quantized modules in place of the float stack (the other stack may stay float)
            where, _, leaf = names[0].rpartition(".")
            experts = modules[0]
            if type(experts) is Experts:
                experts = QuantExperts(experts.gate_up_proj, experts.down_proj)
                _replace(model, where, experts)
            delattr(experts, leaf)  # (the meta Parameter: nn.Module refuses a module in its place)
            setattr(experts, leaf, nn.ModuleList(linear_from(q, dtype) for q in matrices))
            return True
        shared = {}
        for name, old in zip(names, modules):
            _replace(model, name.rpartition(".")[0], _module_for(old, matrices[0], dtype, shared))
        return True

    def summary():
        def show(tally):
            return ", ".join(f"{ggml_blocks.TYPES.get(t, t)} x{n}" for t, n in sorted(tally.items())) or "none"
        return (f"quantize='native': matrices kept packed: {show(kept)}; dequantized to {str(dtype)[6:]} "
                f"(no exact packed form): {show(dequantized)}")

    load.summary = summary
    return load


def check_native(source_is_gguf, where):
    if not source_is_gguf:
        raise ValueError(f"{where}: quantize='native' keeps a GGUF file's quantized blocks, and this is not a "
                         f"GGUF file; use quantize='int8' or 'int4'")
