"""Weight-only quantization: int8 and int4 Linear and Embedding layers, and GGUF blocks kept packed.

    model = zoo.quantize(model, "int4", group_size=32)     # in place; activations stay bfloat16
    model = zoo.from_pretrained("model.Q4_1.gguf", quantize="native")   # the file's own 4-bit codes

Decoding one token reads every weight once, so its speed is set by the bytes of weights read: 16 bits
per weight in bfloat16, 8 in int8, 4 (+ 1 for the group scales and zero points) in int4. The matmuls
are PyTorch's own weight-only kernels: on the CPU `_weight_int8pack_mm` (int8, one scale per output
row) and `_weight_int4pack_mm_for_cpu` (int4, groups of 32-256 weights along the input with a scale and
a zero point each); on CUDA `_weight_int8pack_mm` and tinygemm's `_weight_int4pack_mm`.

One plain form describes every quantized matrix here (`Quantized`): unsigned codes u of `bits` bits,
and per group of `group_size` inputs a scale s and a zero point z, with

    w = (u - 2**(bits-1)) * s + z

which is the int4 kernels' formula. GGUF's blocks of 32 weights map onto it exactly: Q4_0 (q - 8) * d
is u = q, s = d, z = 0; Q4_1 q * d + m is u = q, s = d, z = m + 8 d; Q8_0 q * d is u = q + 128, s = d,
z = 0. Only the fp16 block scales change, rounded to the activations' dtype that the kernels take.

8-bit codes in groups (Q8_0, or int8 with a group size) have no kernel of their own; they run through the
int4 kernel as two 4-bit planes: u = 16 h + l, so w = 16 s (h - 8) + s (l - 8) + (8 s + z), one matmul
over the input repeated twice ([x, x] against [h | l]), exact, and still one byte per weight.

The tied head and token embedding share their codes where the kernel's layout allows (int8 with one
scale per row); otherwise the embedding keeps its own row-major codes for the lookup (int4: an eighth of
the bfloat16 table each). A quantized model generates, batches, beam-searches and compiles like any
other; `save_pretrained` refuses it (save the unquantized model and quantize when loading).
"""
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import unpermute

log = logging.getLogger("zoo")

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
GGUF_BLOCK_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}  # ggml types kept packed by quantize="native"


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

    def rows(self, fn):
        """The same matrix with `fn` (a permutation of rows, e.g. convert.unpermute) applied to its rows."""
        return Quantized(fn(self.codes), fn(self.scale), fn(self.zero), self.bits, self.group_size)


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
    """A GGUF tensor's raw Q4_0 / Q4_1 / Q8_0 blocks (uint8 bytes) -> Quantized with groups of 32, the
    4- or 8-bit codes exactly the file's (see the module's docstring for the mapping)."""
    N, K = shape
    if qtype == 8:  # Q8_0: fp16 d, 32 int8 q; w = q * d
        blocks = raw.view(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()[:, 0]
        u = (blocks[:, 2:].view(torch.int8).short() + 128).to(torch.uint8)
        return Quantized(u.reshape(N, K), d.view(N, -1), torch.zeros(N, K // 32), 8, 32)
    head = {2: 2, 3: 4}[qtype]  # Q4_0: fp16 d; Q4_1: fp16 d, fp16 m
    blocks = raw.view(-1, head + 16)
    dm = blocks[:, :head].contiguous().view(torch.float16).float()
    qs = blocks[:, head:]
    u = torch.stack((qs & 15, qs >> 4), 1)  # low nibbles are weights 0-15 of the block, high ones 16-31
    d = dm[:, 0]
    zero = dm[:, 1] + 8 * d if qtype == 3 else torch.zeros_like(d)
    return Quantized(u.reshape(N, K), d.view(N, -1), zero.view(N, -1), 4, 32)


# ---------------------------------------------------------------------------------------------------------
# Modules


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W int8 [N, K] and one scale per output row (torch's _weight_int8pack_mm)."""

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
        x2 = x.reshape(-1, self.in_features)
        if self.in_features % 16:  # torch 2.13's CPU kernel reads K in blocks of 16 and crashes otherwise
            y = F.linear(x2, self.codes.to(x.dtype) * self.scales[:, None].to(x.dtype))
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x W^T (+ b) through the int4 kernels, W packed in the kernel's layout with group-wise scales and
    zero points [K / group_size, N, 2]. planes=2 holds 8-bit codes as two 4-bit planes (see the module's
    docstring): the kernel then runs over [x, x]."""

    def __init__(self, q: Quantized, dtype, bias=None):
        super().__init__()
        N, K = q.codes.shape
        self.in_features, self.out_features, self.group_size = K, N, q.group_size
        self.planes = 2 if q.bits == 8 else 1
        if q.bits == 8:
            u = torch.cat((q.codes >> 4, q.codes & 15), 1)
            scale = torch.cat((16 * q.scale, q.scale), 1)
            zero = torch.cat((torch.zeros_like(q.zero), 8 * q.scale + q.zero), 1)
        else:
            u, scale, zero = q.codes, q.scale, q.zero
        self.device_type = u.device.type
        if self.device_type == "cuda":
            k = u.shape[1]
            tiles = next(t for t in (8, 4, 2, 1) if k % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.int().contiguous(), 1)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(dtype))
        self.register_buffer("bias", bias)

    @property
    def weight(self):
        """The activations' dtype and device, for the model files that read them from `.weight`."""
        return self.scales_and_zeros

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'int8 as two int4 planes' if self.planes == 2 else 'int4'}, group_size={self.group_size}")

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        if self.planes == 2:
            x2 = torch.cat((x2, x2), 1)
        if self.device_type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


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
            codes = (q.codes.short() - 128).to(torch.int8)
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


def linear_from(q: Quantized, dtype, bias=None):
    """The fastest module for a quantized matrix: the int8 kernel for 8 bits with one (symmetric) scale
    per row, the int4 kernel (one or two planes) otherwise."""
    if q.bits == 8 and q.group_size == q.codes.shape[1] and not q.zero.any():
        return Int8Linear((q.codes.short() - 128).to(torch.int8), q.scale[:, 0].to(dtype), bias)
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
    """Replace `model`'s Linear layers with weight-only quantized ones, in place; returns the model.

    mode: "int8" (symmetric, one scale per output row, or per group of `group_size` inputs) or "int4"
    (asymmetric groups of `group_size` inputs, default 32). head (the output layer) and embeddings
    (nn.Embedding layers): "int8" (the default: one scale per row, one set of codes shared by a tied
    head and embedding), "int4" (groups of `group_size`), or None to keep them as they are. The head
    defaults to int8 even in int4 mode: it is a quarter of a small model's weights, and in 4 bits it
    alone changes the top-1 token of one position in six (SmolLM2-135M; README: Quantized inference).
    Activations, norms and biases use `dtype` (default bfloat16: the int4 kernel has no fast float32
    path). Raises ValueError, changing nothing, for an unknown mode or a group size that does not divide
    a layer's inputs.
    """
    group_size = check_mode(mode, group_size)
    for option, value in (("head", head), ("embeddings", embeddings)):
        if value not in (*MODES, None):
            raise ValueError(f"{option} must be 'int8', 'int4' or None (unquantized), not {value!r}")
    dtype = dtype or torch.bfloat16
    out_layer = _output_layer(model)
    chosen = {}  # name -> (module, bits, group size or None for one group per row)
    for name, m in model.named_modules():
        kind = (head if m is out_layer else mode) if isinstance(m, nn.Linear) else \
            embeddings if isinstance(m, nn.Embedding) else None
        if kind is not None:
            chosen[name] = (m, 8 if kind == "int8" else 4, group_size if kind == mode else check_mode(kind))
    for name, (m, bits, group) in chosen.items():  # check everything before changing anything
        rows, cols = m.weight.shape
        if group is not None and cols % group:
            raise ValueError(f"group_size {group} does not divide {name}'s {cols} inputs: pick one of "
                             f"{', '.join(str(g) for g in GROUP_SIZES if cols % g == 0) or 'none'}"
                             f"{' or None' if bits == 8 else ''}, or leave that layer unquantized")
        if isinstance(m, nn.Linear) and group is not None and rows % 16:
            raise ValueError(f"{name} has {rows} outputs; the int4 kernel needs a multiple of 16 "
                             f"(use int8 with group_size=None, or leave that layer unquantized)")
    for p in model.parameters():  # norms and biases in the activations' dtype
        p.data = p.data.to(dtype)
    done = {}  # (id(weight), bits, group) -> Quantized: a tied head and embedding are quantized once
    for name, (m, bits, group) in chosen.items():
        w = m.weight
        key = (id(w), bits, group)
        if key not in done:
            done[key] = quantize_tensor(w, bits, group or w.shape[1])
        _replace(model, name, _module_for(m, done[key], dtype, done))
    return model


def _module_for(old, q, dtype, shared):
    """The quantized module that stands for `old` (Linear or Embedding); tied int8 rows share codes."""
    key = ("module", id(q))
    if isinstance(old, nn.Embedding):
        emb = QuantEmbedding.from_quantized(q, dtype)
        partner = shared.get(key)
        if isinstance(partner, Int8Linear):  # tied to an int8 head: one set of codes for both
            emb.codes, emb.scales = partner.codes, partner.scales[:, None]
        shared.setdefault(key, emb)
        return emb
    bias = None if old.bias is None else old.bias.detach().to(dtype)
    lin = linear_from(q, dtype, bias)
    partner = shared.get(key)
    if isinstance(lin, Int8Linear) and isinstance(partner, QuantEmbedding):
        partner.codes, partner.scales = lin.codes, lin.scales[:, None]
    shared.setdefault(key, lin)
    return lin


def _output_layer(model):
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
            k = type(m).__name__ + ("(8-bit planes)" if getattr(m, "planes", 1) == 2 else "")
            kinds[k] = kinds.get(k, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items()) + f"; {weight_bytes(model) / 2**20:.1f} MiB of weights"


def weight_bytes(model):
    """Bytes of every distinct parameter and persistent buffer (shared tensors once)."""
    seen = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------
# Loading GGUF blocks packed (from_pretrained(gguf, quantize="native"))


def gguf_packed_loader(model, ckpt, *, device, dtype):
    """The hook that convert.load_weights calls for each of our tensors: where every checkpoint tensor it
    is made of is stored in Q4_0, Q4_1 or Q8_0 blocks, it builds the quantized modules (Linear, and the
    token embedding) from the blocks as they are, and returns True; else False (loaded as usual)."""

    def load(names, parts):
        modules = [model.get_submodule(n.rpartition(".")[0]) for n in names]
        if any("transpose" in p for p in parts) or not all(isinstance(m, (nn.Linear, nn.Embedding)) for m in modules):
            return False
        raws = [ckpt.read_raw(p["from"]) for p in parts]
        if not all(qtype in GGUF_BLOCK_TYPES for qtype, _, _ in raws) or len({q for q, _, _ in raws}) != 1:
            return False
        pieces = []
        for p, (qtype, raw, shape) in zip(parts, raws):
            q = from_gguf_blocks(qtype, raw, shape)
            if p.get("unpermute"):
                q = q.rows(lambda t, n=p["unpermute"]: unpermute(t, n))
            pieces.append(q)
        q = pieces[0] if len(pieces) == 1 else Quantized.cat(pieces)
        q = Quantized(q.codes.to(device), q.scale.to(device), q.zero.to(device), q.bits, q.group_size)
        shared = {}
        for name, old in zip(names, modules):
            _replace(model, name.rpartition(".")[0], _module_for(old, q, dtype, shared))
        return True

    return load


def check_native(source_is_gguf, where):
    if not source_is_gguf:
        raise ValueError(f"{where}: quantize='native' keeps a GGUF file's quantized blocks, and this is not a "
                         f"GGUF file; use quantize='int8' or 'int4'")
