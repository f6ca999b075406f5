"""The training loss without the whole logits: cross-entropy through the output layer, a chunk of positions
at a time (`zoo.train` uses it for every model with an `lm_head`).

A language model's last layer maps each position's hidden state [C] to logits over the vocabulary [V].
For SmolLM2 (V = 49,152) a batch of 8 x 256 positions makes 2048 x 49,152 logits: 200 MB in bf16, 400 MB
as the float32 the loss is computed in, 400 MB more that the log-softmax keeps for the backward pass,
and as much again for their gradient: at a LoRA step's peak, more than the rest of the activations.
Here the loss of each chunk of positions is computed together with its gradient, in the forward pass:
the loss ends the graph, so its gradient is known before the backward pass starts (the idea of
Liger-Kernel's fused linear cross-entropy). One chunk's logits exist at a time, none is kept, none is
recomputed; the backward pass only scales the gradients already computed. Same loss and gradients as
F.cross_entropy(head(hidden).float(), targets) (the chunks' sums added in another order: a test).

    loss_fn = HeadLoss(model)                  # once, before wrapping (DDP, torch.compile)
    loss = loss_fn(net, x, y)                  # mean over the targets that are not IGNORE
    total = loss_fn(model, x, y, reduction="sum", label_smoothing=0.1)   # F.cross_entropy's options

The output layer keeps its name and weights (its forward is replaced on the instance); outside
`loss_fn(...)` it returns logits as before.
Inside one, the layer's hooks see one call with all positions, which returns the loss rather than logits.
"""
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE

CHUNK = 512  # positions per chunk: 512 x 49,152 float32 logits are 100 MB


def _cross_entropy(logits, targets, label_smoothing, want_grad):
    """F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum", label_smoothing=...)
    and, if wanted, its gradient with respect to the logits (in their dtype), written out: in place over one
    float32 copy of the logits [n, V], where autograd's log-softmax and NLL would allocate four, and in as
    few passes over it as the arithmetic allows (at 100 MB a chunk, each pass costs about 10 ms here)."""
    eps = label_smoothing  # (PyTorch's: the target's (1 - eps) of the mass, the uniform's eps)
    z = logits.to(torch.float32, copy=True)  # [n, V]
    valid = targets != IGNORE  # [n]
    target = targets.masked_fill(~valid, 0)[:, None]  # [n, 1] (any other negative target: gather raises)
    z.sub_(z.amax(-1, keepdim=True))  # logits - their max (the loss is the same; exp cannot overflow)
    z_target = z.gather(1, target)[:, 0]  # [n]
    z_mean = z.mean(-1) if eps else 0.0  # [n]
    total = z.exp_().sum(-1)  # [n]; z is exp(z) from here
    # -log p(target) = log sum exp z - z_target; smoothing mixes in the mean of -log p over the vocabulary
    per_row = total.log() - (1 - eps) * z_target - eps * z_mean
    loss = torch.where(valid, per_row, 0).sum()
    if not want_grad:
        return loss, None
    # softmax - (1 - eps) onehot - eps / V; ignored rows all zero (divided by an infinite total)
    grad = z.div_(torch.where(valid, total, torch.inf)[:, None])
    grad.scatter_add_(1, target, torch.where(valid, eps - 1, 0.0).to(z.dtype)[:, None])
    if eps:
        grad.sub_(valid[:, None].to(z.dtype) * (eps / z.shape[-1]))
    return loss, grad.to(logits.dtype)


class _HeadCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of head(hidden) against targets, and its gradients with respect to hidden and
    the head's parameters, one chunk of rows at a time; the backward pass scales them by its incoming
    gradient (once: the graph cannot be kept for a second backward pass)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, label_smoothing, chunk, grad_enabled, *params):  # hidden [N, C]
        # needs_input_grad says which inputs require a gradient, not whether gradients are on: under
        # torch.no_grad (evaluation) a trainable head must not cost its gradient.
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        wants = [grad_enabled and need for need in ctx.needs_input_grad[6:]]
        wanted = [p for p, want in zip(params, wants) if want]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # The chunks' gradients are added in float32, as one GEMM over all rows would (a bf16 head: FSDP's).
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in wanted]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].detach().requires_grad_(want_hidden)
            inputs = ([h] if want_hidden else []) + wanted
            with torch.set_grad_enabled(bool(inputs)):  # (a Function's forward runs without)
                logits = head(h)  # [chunk, V], in the dtype the model computes in
            loss, grad_logits = _cross_entropy(logits.detach(), targets[i:i + chunk], label_smoothing, bool(inputs))
            if inputs:
                grads = list(torch.autograd.grad(logits, inputs, grad_logits))
                if want_hidden:
                    grad_hidden[i:i + chunk] = grads.pop(0)
                for acc, g in zip(grad_params, grads):
                    acc += g
            total += loss.detach()
        ctx.save_for_backward(*([grad_hidden] if want_hidden else []), *grad_params)
        ctx.want_hidden, ctx.wants, ctx.dtypes = want_hidden, wants, [p.dtype for p in wanted]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.dtypes is None:
            raise RuntimeError("the chunked loss's gradients were already used: its backward pass runs once "
                               "(retain_graph is not supported)")
        saved = [g.mul_(grad) for g in ctx.saved_tensors]  # in place: the weight's gradient can be 100s of MB
        grad_hidden = saved.pop(0) if ctx.want_hidden else None
        grad_params = [g.to(dtype) for g, dtype in zip(saved, ctx.dtypes)]
        ctx.dtypes = None
        return (grad_hidden, None, None, None, None, None, *[grad_params.pop(0) if w else None for w in ctx.wants])


def _head_forward(head, hidden):
    """The output layer's forward once a HeadLoss is attached: its logits, or inside a loss call the loss.
    (Bound to the head as a method, so a deep copy of the model gets one bound to its own head.)"""
    logits_of = type(head).forward.__get__(head)  # the layer's own forward (its hooks ran already)
    request = head._loss_request
    if request is None:  # not inside a loss call: the logits, as always
        return logits_of(hidden)
    targets, label_smoothing, reduction, chunk = request
    total = _HeadCrossEntropy.apply(hidden.flatten(0, -2), targets, logits_of, label_smoothing, chunk,
                                    torch.is_grad_enabled(), *head.parameters())
    return total / (targets != IGNORE).sum() if reduction == "mean" else total


class HeadLoss:
    """The mean cross-entropy of a model's output against targets, through its `lm_head` in chunks (see the
    module's docstring); a model without one (the bigram) gets F.cross_entropy of its logits."""

    def __init__(self, model, chunk=CHUNK):
        self.chunk = chunk
        head = getattr(model, "lm_head", None)
        self.head = head if isinstance(head, nn.Module) else None
        if self.head is not None and "_loss_request" not in vars(self.head):  # attached once per model
            self.head._loss_request = None
            # a compiled model runs its head eagerly: the chunk loop is no graph to trace. (Disabled here, not by
            # a decorator: torch.compiler.disable imports torch._dynamo, 1.7 s that every `zoo` command would pay.)
            self.head.forward = types.MethodType(torch.compiler.disable(_head_forward), self.head)

    def __call__(self, net, x, y, label_smoothing=0.0, reduction="mean"):
        """net(x)'s loss against y [B, T] (net: the model, or DDP / torch.compile around it): the mean over
        the targets that are not IGNORE, or their sum."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        if self.head is None:
            return F.cross_entropy(net(x).float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                   reduction=reduction, label_smoothing=label_smoothing)
        self.head._loss_request = (y.flatten(), label_smoothing, reduction, self.chunk)
        try:
            return net(x)
        finally:
            self.head._loss_request = None
