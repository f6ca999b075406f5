"""Linear layers on the CPU with their weights reordered once into oneDNN's own layout, for inference: bfloat16 ones,
and float32 ones on x86 CPUs (AVX2, AVX-512).

`F.linear` hands oneDNN a plain row-major weight on every call; a weight reordered once into oneDNN's blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing does to constant weights) skips that
work. The products are the same, bit for bit (tests/test_prepack.py; but for a lone row over more than
LONE_ROW_SPLIT inputs, which gets the bits it would have among other rows), and decoding's few rows get them 1.4-2.2x
faster: on one AMD EPYC core, SmolLM2's 576 -> 1536 projection took 84 -> 45 us for one row and 134 -> 88 us for
eight, its 49,152-token head 9.4 -> 4.3 ms and 8.7 -> 5.0 ms; from ~40 rows on (prefill) the two are level.

    model = prepack(model)          # in place; the model's bfloat16 Linear layers on the CPU, for inference only

A prepacked weight has no gradient, cannot be saved or moved, and torch.compile cannot trace it: prepack a model
this process loaded to serve or generate eagerly (`zoo serve`, `generate` and `chat` do, in bfloat16 on the CPU),
not one it will train or save, and one whose decode step it will compile with linear=False (below). A tied head
gets its own reordered copy; the embedding keeps the plain table.
A mixture of experts' stacked experts (models/moe.py) are reordered expert by expert (PrepackedExperts): on
bench/moe.py's OLMoE-shaped model (one EPYC core) bf16 decoding went 29 -> 44 tok/s and a 256-token prefill 285 ->
251 ms, the products again the same bit for bit.

A quantized layer of 8-bit codes in groups (GGUF's Q8_0, Q5_0, Q5_1 and Q5_K blocks, a fused matrix widened to 8
bits, int8 with a group size) runs torch's int4 kernel as two 4-bit planes, over twice its inputs, or the zoo's
int8_rows where it is built (zoo/kernels.py), and either's time grows with the rows: 2.0 ms for 32 rows of Gemma 3
270M's Q5_0 gate|up projection (4,096 x 640) in planes, 1.3-1.4 ms by int8_rows on Zen 4, where a bf16 GEMM takes
0.4-0.5. prepack gives each such layer (not the output layer, which a prompt's prefill applies to its last position
alone) a PrepackedLinear over its dequantized matrix, which a prompt's products over DENSE_ROWS rows or more take
(zoo/modes.py's prompt_mode, where zoo prefills), on a CPU with bf16 arithmetic: Gemma's 32-token prefill 97 -> 56-63
ms, for 2 bytes a weight more (130 MB for its 65M weights in planes). Decoding steps, speculative checks and compiled
steps keep the kernel: its products are the same for a row in a batch as alone, where the copies round otherwise.
They add at most half again to what the model's weights take (COPY_BUDGET), the largest layers that fit first: a
model mostly of 8-bit codes (a Q8_0 or Q5_K_M file) would otherwise triple its memory, and gets copies of some.
(Gemma 3's Q4_K_M file, its 8-bit layers row-major: 153 MB of copies for all, against a budget of 138; its 18
gate|up layers, 9 Q6_K down projections and 10 of its 18 q|k|v get them, 138 MB: a 32-token prefill 84-116 -> 51-53
ms on Zen 4.)

Float32's `F.linear` (MKL) packs the weight again on every call, and its time grows with the rows from the second.
On an AVX2-only CPU (AMD's Zen 3 EPYC) oneDNN's reordered float32 weights took SmolLM2's 576 -> 1536 projection over
8 rows 230 -> 138 us, its head 19.0 -> 6.7 ms (one row: 8.5 -> 5.0 ms; one-off scripts); on an AVX-512 one (Zen 4,
2 threads, thirty matrices streamed from memory) its 960 x 576 q|k|v 210 -> 120 us for one row and 366 -> 102 us for
six, the head 9.7 -> 5.0 ms and 23.9 -> 4.1 ms, and still 1.1-1.25x at 512 rows. prepack reorders float32 layers on
both (onednn_float32), on Intel's AVX-512 CPUs too (unmeasured there). A row's product is the same in a batch as
alone (with LONE_ROW_SPLIT; MKL's differ from the second row on), not F.linear's bits.

Decoding's attention, a few queries over the KV cache, goes to the zoo's own kernel where it is built (any x86 CPU with
AVX2; zoo/kernels.py): each attention's Attend becomes a CacheAttend (cache_attention), which sends the calls with a
mask and at most KERNEL_QUERIES queries to zoo_kernels::attend and the rest to the model file's Attend. torch's CPU
SDPA spends ~40-55 us on SmolLM2's one query over 160 keys, most of it fixed cost; the kernel 13-15 (`python
bench/attend.py`: 2.3-3.2x on SmolLM2's heads, 1.6-2.5x on Gemma 3's, from 32 to 4,096 keys). It computes in
float32 and rounds once, so its outputs are not SDPA's bits (within bf16 rounding of a float64 reference, tested),
but each query row's are the same alone, in a batch, in a speculative check and over hidden slots (tested).

On a CPU whose oneDNN has no bf16 kernels (AVX2 only, e.g. AMD's Zen 3: its reorder raises) torch multiplies bf16
matrices in a reference loop, 4-7x slower than float32's GEMM from 32 rows on (Gemma 3's 2,048 x 640 layer, 32 rows:
4.8 ms against 1.0 ms widening both to float32 on each call). There prepack gives the bfloat16 layers a WidenedLinear,
whose prompts multiply in float32 (decoding's few rows keep bf16's product, as fast for one row), and the layers in
planes their copies as WidenedLinear modules over bf16 matrices: Gemma 3's native 32-token prefill 305-319 ->
221-233 ms there. 8-bit layers kept row-major for the zoo's int8_rows get no such copy there: its 32 rows were as
fast as the copies' float32 GEMM (114-122 against 120-125 ms for Gemma 3's prefill).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels, quantization
from .models.moe import Experts
from .modes import in_prompt
from .progress import log
from .quantization import Int4Linear, output_layer

# the quantized layers' bf16 copies may add at most this share of the model's weights' bytes to its memory
COPY_BUDGET = 0.5
# oneDNN multiplies a lone row over more inputs than this by its own kernel, which sums the products in another order
# than its kernel for 2-29 rows (on Zen 4, bf16 and float32 alike; up to 1,024 inputs the two agreed in a one-off
# check): a decoding step's row would round apart from the same row in a speculative check or beside other requests,
# and in bf16 a near-tie fall the other way. PrepackedLinear multiplies such a row as two (itself twice): SmolLM2's
# 1,536-input down projections 90 -> 120 us a row, its eager decoding ~2-3% slower in bf16, ~6% in float32.
LONE_ROW_SPLIT = 1024
# CacheAttend's kernel takes calls of at most this many queries per head (decoding steps, speculative checks)
KERNEL_QUERIES = 16


class PrepackedLinear(nn.Module):
    """y = x Wᵀ (+ b) by oneDNN over W [out_features, in_features] (bf16, or float32 where onednn_float32) reordered
    once (see the module's docstring);
    persistent=False: a copy beside a layer's own weights (Int4Linear.dense), left out of the state dict."""

    def __init__(self, weight, bias, rows, persistent=True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows),  # W's dtype
                             persistent=persistent)
        self.register_buffer("bias", None if bias is None else bias.detach())

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x):
        if x.numel() == self.in_features > LONE_ROW_SPLIT:  # one row, multiplied as two: see LONE_ROW_SPLIT
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(1, -1).expand(2, -1), self.weight, self.bias, "none", [],
                                                   "")
            return y[:1].view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class WidenedLinear(nn.Module):
    """y = x Wᵀ (+ b) over a bfloat16 W on a CPU without oneDNN's bf16 kernels (see the module's docstring): inside
    zoo.modes.prompt_mode, x and W widen to float32 for the product (exact products, summed in float32 as bf16's
    are) and y rounds back to x's dtype; outside (decoding steps, compiled steps) bf16's own product. W and b are the
    layer's own tensors, not copies; persistent=False: a copy beside a layer's own weights (Int4Linear.dense)."""

    def __init__(self, weight, bias, persistent=True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach(), persistent=persistent)
        self.register_buffer("bias", None if bias is None else bias.detach())

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x):
        if not torch.compiler.is_compiling() and in_prompt():
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class PrepackedExperts(Experts):
    """A mixture's stacked experts (models/moe.py's Experts) with each expert's two matrices a PrepackedLinear: the
    model file's grouping of tokens by expert is kept, so a decoding step still reads its k experts alone."""

    def __init__(self, experts: Experts, rows):
        nn.Module.__init__(self)  # not Experts': no float stacks to allocate
        self.gate_up_proj, self.down_proj = (nn.ModuleList(PrepackedLinear(w, None, rows) for w in stack)
                                             for stack in (experts.gate_up_proj, experts.down_proj))

    def expert_weights(self):
        return list(self.gate_up_proj), list(self.down_proj)

    def expert(self, x, gate_up_proj, down_proj):
        gate, up = gate_up_proj(x).chunk(2, dim=-1)  # [n, F] each
        return down_proj(F.silu(gate) * up)  # [n, D]


class CacheAttend(nn.Module):
    """A model file's Attend (each attention's `attend` child: models/__init__.py) for decoding on the CPU: the few
    queries of a step, a speculative check or a batch of steps over the KV cache (the calls with a mask) by the
    zoo's attend kernel (zoo/kernels.py), 2-3x faster than torch's SDPA there (python bench/attend.py); everything
    else (prompts, gradients, dropout, CUDA, what the kernel does not take) by the file's own Attend, `inner`.
    zoo.trace and zoo.intervene see the same calls: the signature is Attend's. (cache_attention makes them.)"""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v, mask, causal, dropout_p=0.0, scale=None):
        if mask is not None and q.size(2) <= KERNEL_QUERIES and q.device.type == "cpu" and dropout_p == 0 and \
                q.dtype in (torch.bfloat16, torch.float32) and k.dtype == v.dtype == q.dtype == mask.dtype and \
                k.shape == v.shape and q.size(1) % k.size(1) == 0 and q.size(-1) % 8 == 0 and q.size(-1) <= 512 and \
                k.stride(-1) == v.stride(-1) == 1 and not torch.is_autocast_enabled("cpu") and \
                not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return torch.ops.zoo_kernels.attend(q, k, v, mask, causal, scale)
        return self.inner(q, k, v, mask, causal, dropout_p, scale)


def onednn_bf16():
    """Whether this CPU's oneDNN has bf16 kernels (what its weight reorder and bf16 products need): AVX-512 BW/VL/DQ,
    AVX-NE-CONVERT or Arm's bf16."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_float32():
    """Whether float32 layers multiply faster over oneDNN's reordered weights than through F.linear (MKL): on x86 CPUs
    with AVX2 or AVX-512, measured on AMD's Zen 3 and Zen 4 (see the module's docstring)."""
    return torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def reorders(tensor):
    """Whether prepack reorders a CPU layer with weights like `tensor` for oneDNN (PrepackedLinear)."""
    return tensor.device.type == "cpu" and (tensor.dtype == torch.bfloat16 and onednn_bf16() or
                                            tensor.dtype == torch.float32 and onednn_float32())


def widens(tensor):
    """Whether prepack gives a CPU layer with weights like `tensor` a WidenedLinear: bf16 without oneDNN's kernels."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16 and not onednn_bf16()


def prepack(model, rows=8, *, linear=True):
    """Replace every nn.Linear of `model` that `reorders` (bfloat16 on the CPU; float32 too where onednn_float32) by
    a PrepackedLinear (its weight reordered for a product over `rows` rows, oneDNN's hint; any number of rows works),
    and every such Experts by PrepackedExperts; give bfloat16 quantized layers of 8-bit codes, bar the output layer,
    a PrepackedLinear over the dequantized weight for a prompt's products, the largest within COPY_BUDGET; on a
    CPU without oneDNN's bf16 kernels, WidenedLinear modules in both roles (see the module's docstring); returns the
    model. linear=False leaves the layers oneDNN would reorder as they are: for a model whose decode step
    torch.compile will trace (it cannot trace reordered weights, and fuses its own; it traces a WidenedLinear as the
    plain layer). Each attention's plain Attend becomes a CacheAttend (cache_attention)."""
    head = output_layer(model)
    # copies where bf16 GEMMs run natively (oneDNN's), or widen to float32 (WidenedLinear) for layers in planes; not
    # for row-major 8-bit codes there (int8_rows' 32 rows were as fast as the widened copies' GEMM on an AVX2-only
    # EPYC: 114-122 against 120-125 ms for Gemma 3's prefill), nor where oneDNN emulates bf16 GEMMs (AVX-512 without
    # its BF16 extension); the largest layers first, as many as the budget holds
    eight_bit = [m for m in model.modules() if isinstance(m, Int4Linear) and m.planes == 2 and m.dense is None
                 and m is not head and m.dequantizable() and m.weight.dtype == torch.bfloat16
                 and m.weight.device.type == "cpu" and (m.packed is not None or not widens(m.weight))]
    def cost(m):  # a copy's bytes
        return 2 * m.in_features * m.out_features
    budget = COPY_BUDGET * quantization.weight_bytes(model)
    copies = sum(cost(m) for m in model.modules() if isinstance(m, Int4Linear) and m.dense is not None)  # (earlier)
    chosen = []
    for m in sorted(eight_bit, key=cost, reverse=True):
        if copies + cost(m) <= budget:
            chosen.append(m)
            copies += cost(m)
    if chosen and (quantization.native_bf16() or not onednn_bf16()):
        for m in chosen:
            w = m.dequantized().to(m.weight.dtype)
            m.dense = WidenedLinear(w, None, persistent=False) if widens(w) else \
                PrepackedLinear(w, None, rows, persistent=False)
        log.info("prepack: bf16 copies of %d of %d quantized 8-bit layers, for prompts: %.0f MB", len(chosen),
                 len(eight_bit), copies / 1e6)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and widens(child.weight):
                setattr(module, child_name, WidenedLinear(child.weight, child.bias))
            elif type(child) is nn.Linear and reorders(child.weight) and linear:
                setattr(module, child_name, PrepackedLinear(child.weight, child.bias, rows))
            elif type(child) is Experts and reorders(child.gate_up_proj) and linear:
                setattr(module, child_name, PrepackedExperts(child, rows))
    return cache_attention(model)


def cache_attention(model):
    """Give each attention's plain Attend (not Gemma 2's CappedAttend: its scores are capped) a CacheAttend, where the
    zoo's kernels are built; returns the model (prepack does this too)."""
    if kernels.attend() is not None:
        for module in list(model.modules()):
            if type(getattr(module, "attend", None)).__name__ == "Attend":
                module.attend = CacheAttend(module.attend)
    return model
