"""LoRA (Hu et al., 2021): low-rank adapters beside frozen Linear layers.

    lora.add_lora(model, r=8, alpha=16)     # adapters on every Linear but the output head; the rest frozen
    ... train: only the adapters' A and B require grad ...
    lora.merge_lora(model)                  # W + (alpha / r) B A folded in: plain Linear layers again

Each adapted layer computes y = W x + (alpha / r) * B(A(dropout(x))), A [r, in] initialised as the paper's
code does (Kaiming-uniform, as nn.Linear), B [out, r] zero, so training starts from the base model exactly.

A fused projection (q|k|v, gate|up as one matmul) takes `slices`: the row counts of its parts. Each part
gets its own A (r rows) and B, so the adapter is exactly separate LoRAs on separate projections (what
PEFT keeps for models whose projections are separate) and a part may have none (PEFT's common q, v-only
adapters). The delta is one matmul all the same: the parts' B blocks placed block-diagonally.

The frozen base may be any module with in_features, out_features and forward(x), quantized ones
included: zoo.quantize's Int8Linear passes the gradient back to its input (to the adapters below) while
the base itself gets none and is never dequantized for long.

A mixture of experts' stacked experts (models/moe.py) take LoRAExperts: each expert its own A and B on each
adapted stack (gate_up_proj, down_proj), as PEFT's LoRA on stacked expert parameters (target_parameters).
"""
import fnmatch
import math
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.moe import Experts
from .quantization import Int4Linear, Int8Linear, QuantExperts, expert_project, native_bf16

STACKS = ("gate_up_proj", "down_proj")  # an experts module's parameters, in their order (PEFT nests by it)


class _Widened(torch.autograd.Function):
    """y = x w^T + b for bf16 x and a frozen w, computed by float32 GEMMs, output rounded to bf16. The
    backward gives x's gradient the same way; it keeps w itself (no float32 copy) for it."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(w)
        y = F.linear(x.float(), w.to(torch.bfloat16).float(), None if b is None else b.to(torch.bfloat16).float())
        return y.to(torch.bfloat16)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:  # (the lowest adapted layer's input: the frozen embedding's output)
            return None, None, None
        w, = ctx.saved_tensors
        return (grad.float() @ w.to(torch.bfloat16).float()).to(torch.bfloat16), None, None


def _widened_linear(base, x):
    """A frozen linear layer computing in bf16 (under CPU bf16 autocast, or a bf16 layer given bf16 x: a LoRA run's
    bf16 base) on a CPU without bf16 arithmetic: the bf16 operands (x and the weight rounded to bf16) multiplied
    by the float32 units. The products of bf16 numbers are exact in float32 and a bf16 GEMM accumulates in float32
    too, so this is the same bf16 compute (output rounded to bf16), 3-4x faster there (AVX-512 without BF16), and
    ~6x on an AVX2-only one (AMD Zen 3: 768 x 576 by 8,192 x 576, 377 -> 60 ms), where torch runs bf16 GEMMs through
    its reference loop. None where it does not apply."""
    if not (isinstance(base, nn.Linear) and x.device.type == "cpu") or native_bf16():
        return None
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if not (autocast or x.dtype == base.weight.dtype == torch.bfloat16):
        return None
    with torch.autocast("cpu", enabled=False):
        return _Widened.apply(x.to(torch.bfloat16), base.weight, base.bias)


def frozen_forward(base, x):
    y = _widened_linear(base, x)
    return base(x) if y is None else y


class LoRALinear(nn.Module):
    """A frozen `base` plus a low-rank update: y = base(x) + scaling * B(A(dropout(x))), scaling = alpha / r.

    slices: the row counts of a fused base's parts (default: one part, all its rows); adapted: which parts
    get an adapter (default all). lora_A [parts adapted * r, in] stacks their A's; lora_B [their rows, r]
    their B's. The adapter's parameters are float32 (what the optimizer updates) and cast to the
    activations' dtype in the forward pass.
    """

    def __init__(self, base, r=8, alpha=16, dropout=0.0, slices=None, adapted=None, scaling=None):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, not {r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slices = list(slices or [self.out_features])
        self.adapted = list(adapted or [True] * len(self.slices))
        if sum(self.slices) != self.out_features or len(self.adapted) != len(self.slices) or not any(self.adapted):
            raise ValueError(f"slices {self.slices} (adapted {self.adapted}) do not split {self.out_features} "
                             "outputs with at least one adapted part")
        self.r, self.alpha = r, alpha
        self.enabled = True  # False: the base alone (see adapters_off)
        self.scaling = alpha / r if scaling is None else scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        n = sum(self.adapted)
        device = next((t.device for t in (*base.parameters(), *base.buffers())), None)
        self.lora_A = nn.Parameter(torch.empty(n * r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(sum(s for s, a in zip(self.slices, self.adapted) if a), r,
                                               device=device))
        for a in self.lora_A.data.split(r):  # each part's A as the paper's code (and PEFT) initialise it
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @property
    def weight(self):
        """The base's weight (model files read its dtype and device)."""
        return self.base.weight

    def extra_repr(self):
        parts = "" if len(self.slices) == 1 else f", slices={self.slices}, adapted={self.adapted}"
        return f"r={self.r}, alpha={self.alpha}{parts}"

    def delta_B(self):
        """B of the whole output [out, parts adapted * r]: each adapted part's B in its own rows and its
        own r columns, zero elsewhere (one block per part; a part without an adapter is an empty block)."""
        if len(self.slices) == 1:
            return self.lora_B
        blocks, B = [], self.lora_B.split([s for s, a in zip(self.slices, self.adapted) if a])
        it = iter(B)
        for rows, a in zip(self.slices, self.adapted):
            blocks.append(next(it) if a else self.lora_B.new_zeros(rows, 0))
        return torch.block_diag(*blocks)

    def delta_weight(self):
        """scaling * B A [out, in], in float32: what merging adds to the base weight."""
        return self.scaling * (self.delta_B().float() @ self.lora_A.float())

    def forward(self, x):
        y = frozen_forward(self.base, x)  # [..., out]
        if not self.enabled:
            return y
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # [..., parts * r]
        return y + self.scaling * F.linear(h, self.delta_B().to(x.dtype)).to(y.dtype)  # [..., out]


class LoRAExperts(Experts):
    """A mixture's experts (models/moe.py's Experts, float or zoo.quantize's QuantExperts) frozen, with a low-rank
    update of each expert's matrix in the adapted stacks: W_e + scaling * B_e A_e, for expert e. lora_A[stack]
    [E, r, in] and lora_B[stack] [E, out, r] (float32; B zero, A as LoRALinear's). The computation is the base's,
    tokens grouped by expert: y = W_e x + scaling * B_e (A_e x) for the tokens of expert e. No dropout: PEFT's
    ParamWrapper, which adds B A to the weight, has none (the adapter's input is not separable from the base's)."""

    def __init__(self, base, r=8, alpha=16, stacks=STACKS, scaling=None):
        nn.Module.__init__(self)  # not Experts': the base holds the weights
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, not {r}")
        self.base, self.r, self.alpha, self.stacks = base, r, alpha, list(stacks)
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = alpha / r if scaling is None else scaling
        self.enabled = True
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name, weights in zip(STACKS, base.expert_weights()):
            if name in self.stacks:
                out, inputs = _shape(weights[0])
                device = next((t.device for t in (*base.parameters(), *base.buffers())), None)
                self.lora_A[name] = nn.Parameter(torch.empty(len(weights), r, inputs, device=device))
                self.lora_B[name] = nn.Parameter(torch.zeros(len(weights), out, r, device=device))
                for a in self.lora_A[name].data:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, stacks={self.stacks}"

    def expert_weights(self):
        """Each expert's (base matrix, A_e, B_e) per stack; (base matrix, None, None) where not adapted."""
        out = []
        for name, weights in zip(STACKS, self.base.expert_weights()):
            if name in self.lora_A:
                out.append(list(zip(weights, self.lora_A[name].unbind(), self.lora_B[name].unbind())))
            else:
                out.append([(w, None, None) for w in weights])
        return out

    def expert(self, x, gate_up_proj, down_proj):
        gate, up = self.project(gate_up_proj, x).chunk(2, dim=-1)  # [n, F] each
        return self.project(down_proj, F.silu(gate) * up)  # [n, D]

    def project(self, weights, x):
        w, A, B = weights
        y = expert_project(w, x)  # [n, out]
        if A is None or not self.enabled:
            return y
        return y + self.scaling * ((x @ A.to(x.dtype).mT) @ B.to(x.dtype).mT).to(y.dtype)

    def delta_weight(self, name):
        """scaling * B_e A_e of every expert of one stack [E, out, in], in float32: what merging adds."""
        return self.scaling * (self.lora_B[name].float() @ self.lora_A[name].float())


def _shape(w):
    """(out, in) of one expert's matrix: a float tensor or a quantized linear module."""
    return (w.out_features, w.in_features) if isinstance(w, nn.Module) else tuple(w.shape)


class Frozen(nn.Module):
    """A frozen linear layer that no adapter wraps (the output head, layers outside the targets), computed as
    the adapted ones' bases are: a bf16 one (or a float one under CPU bf16 autocast) as bf16 compute on the
    float32 units where the CPU has no bf16 arithmetic (see _widened_linear)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return frozen_forward(self.base, x)


def matches(name, patterns):
    """Whether a module name matches one of `patterns`: the name itself, its last components (".q_proj"
    matches "q_proj" and "self_attn.q_proj"), or a shell-style pattern ("model.layers.2?.*")."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def adaptable(module):
    return isinstance(module, (nn.Linear, Int8Linear))


def check_adaptable(model):
    """Refuse a model whose layers are packed to 4 bits (zoo.quantize's int4, a GGUF's native blocks): no LoRA
    adapter goes on those."""
    inside = {id(m) for e in model.modules() if isinstance(e, QuantExperts) for m in e.modules()}  # (LoRAExperts')
    head = getattr(model, "lm_head", None)  # (no default target)
    if any(isinstance(m, Int4Linear) and id(m) not in inside and m is not head for m in model.modules()):
        raise ValueError("this model's layers are packed to 4 bits (int4, or a GGUF's blocks kept native), which a "
                         "LoRA adapter cannot go on: quantize to int8 instead (LoRA over int8, as --lora-int8 "
                         "trains), or add the adapter to the unquantized model and quantize the merged one")


def add_lora(model, r=8, alpha=16, dropout=0.0, targets=None, slices=None, scaling=None):
    """Wrap the chosen linear layers of `model` in LoRALinear, in place, freeze everything else, return model.

    targets: module-name patterns (see `matches`); default every linear layer except the output head
    (`model.lm_head`) and a mixture's routers, with a mixture's experts (both stacks, LoRAExperts). slices:
    {module name: [(part name, rows), ...]} for fused layers; a pattern that names a part adapts that part
    alone; "<experts>.gate_up_proj" and "<experts>.down_proj" name an experts module's stacks. The other
    linear layers become Frozen (see there). Raises ValueError, changing nothing, when no layer matches, a
    layer already has an adapter, or experts are adapted with dropout (see LoRAExperts).
    """
    check_adaptable(model)
    slices = slices or {}
    head = getattr(model, "lm_head", None)
    # a mixture's routers (the linear layers beside its experts) pick the experts: adapted only when named
    routers = {id(r) for m in model.modules() if isinstance(getattr(m, "experts", None), Experts)
               for r in m.children() if isinstance(r, nn.Linear)}
    plan, experts = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, Frozen, LoRAExperts)):
            raise ValueError(f"{name} already has an adapter: merge_lora(model) first, or add to a fresh model")
        if any(name.startswith(e + ".") for e in experts):
            continue  # (a quantized expert's own modules)
        if isinstance(m, Experts):
            experts[name] = [s for s in STACKS
                             if targets is None or matches(f"{name}.{s}", targets)]
            continue
        if not adaptable(m):
            continue
        parts = slices.get(name) or [(name, m.out_features)]
        if targets is None:
            adapted = [m is not head and id(m) not in routers] * len(parts)
        else:
            whole = matches(name, targets)
            adapted = [whole or matches(part, targets) for part, _ in parts]
        if any(adapted) and any(t is m.weight for t in _shared_weights(model, m)):
            raise ValueError(f"{name} shares its weight with another layer (a tied output head and embedding): "
                             "an adapter there would change both; leave it out of the targets")
        plan[name] = (m, [rows for _, rows in parts], adapted)
    if dropout and any(experts.values()):
        raise ValueError(f"LoRA dropout {dropout} on a mixture's experts: LoRA on stacked experts has none (PEFT's "
                         "neither); set dropout 0, or leave the experts out of the targets")
    if not any(any(a) for _, _, a in plan.values()) and not any(experts.values()):
        shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in plan})) or "none"
        raise ValueError(f"no linear layer matches the LoRA targets {targets or '(default)'}; this model's linear "
                         f"layers are named {shown}" + (" (and their parts " + ", ".join(sorted(
                             {p.rsplit('.', 1)[-1] for ps in slices.values() for p, _ in ps})) + ")" if slices else "")
                         + ("; its experts' stacks: " + ", ".join(f"{'.'.join(e.split('.')[-2:])}.{stack}" for e in
                                                                  sorted(experts)[:1] for stack in STACKS)
                            + " (in each layer)" if experts else ""))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (m, rows, adapted) in plan.items():
        if any(adapted):
            new = LoRALinear(m, r, alpha, dropout, slices=rows, adapted=adapted, scaling=scaling)
        else:
            new = Frozen(m)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for name, stacks in experts.items():
        if stacks:
            parent, _, child = name.rpartition(".")
            m = model.get_submodule(name)
            setattr(model.get_submodule(parent), child, LoRAExperts(m, r, alpha, stacks, scaling=scaling))
    return model


def _shared_weights(model, module):
    """The weights of `model`'s other modules (a tied embedding shares the output head's)."""
    if not isinstance(getattr(module, "weight", None), nn.Parameter):
        return []
    return [m.weight for m in model.modules() if m is not module and isinstance(getattr(m, "weight", None),
                                                                                    nn.Parameter)]


def lora_layers(model):
    """{module name: LoRALinear} of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_experts(model):
    """{module name: LoRAExperts} of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExperts)}


def has_lora(model):
    return any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())


@contextmanager
def adapters_off(model):
    """Inside, every LoRALinear of `model` computes its frozen base alone: the model before fine-tuning, with
    no second copy in memory (DPO's reference model; PEFT's disable_adapter)."""
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W + scaling * B A, computed in float32) and put the plain
    layers back, in place; returns the model. An int8 base is dequantized into a Linear of the scales'
    dtype; Frozen wrappers give back their layers."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRAExperts):
            new = _merged_experts(m)
        elif isinstance(m, Frozen):
            new = m.base
        elif isinstance(m, LoRALinear):
            base = m.base
            if isinstance(base, Int8Linear):
                w = base.codes.float() * base.scales.float()[:, None]
                new = nn.Linear(base.in_features, base.out_features, bias=getattr(base, "bias", None) is not None,
                                device=base.codes.device, dtype=base.scales.dtype)
                if new.bias is not None:
                    new.bias.copy_(base.bias)
            elif isinstance(base, nn.Linear):
                w, new = base.weight.float(), base
            else:
                raise TypeError(f"{name}: cannot merge an adapter into a {type(base).__name__} (no weight to add to)")
            new.weight.data = (w + m.delta_weight().to(w.device)).to(new.weight.dtype)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _merged_experts(m):
    """The float Experts of a LoRAExperts with W_e + scaling * B_e A_e folded in (an int8 base dequantized)."""
    stacks = {}
    for name, weights in zip(STACKS, m.base.expert_weights()):
        if all(isinstance(w, Int8Linear) for w in weights):
            w = torch.stack([x.codes.float() * x.scales.float()[:, None] for x in weights]).to(weights[0].scales.dtype)
        elif all(isinstance(w, torch.Tensor) for w in weights):
            w = torch.stack(list(weights))
        else:
            raise TypeError(f"cannot merge an adapter into {type(weights[0]).__name__} experts (no weight to add to)")
        if name in m.lora_A:
            w = (w.float() + m.delta_weight(name).to(w.device)).to(w.dtype)
        stacks[name] = w
    E, F2, D = stacks["gate_up_proj"].shape
    with torch.device("meta"):
        new = Experts(SimpleNamespace(n_expert=E, expert_dim=F2 // 2, n_embd=D))
    new.gate_up_proj, new.down_proj = (nn.Parameter(t.detach()) for t in stacks.values())
    return new
