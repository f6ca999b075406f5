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

The output layer keeps its name and weights (its forward is replaced on the instance, as
distributed.checkpoint_blocks replaces the blocks'); outside `loss_fn(...)` it returns logits as before.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE

CHUNK = 512  # positions per chunk: 512 x 49,152 float32 logits are 100 MB


class _HeadCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of head(hidden) against targets, and its gradients with respect to hidden and
    the head's parameters, one chunk of rows at a time; the backward pass scales them by its incoming
    gradient."""

    @staticmethod
    def forward(ctx, hidden, targets, head, label_smoothing, chunk, *params):  # hidden [N, C], targets [N]
        want_hidden = ctx.needs_input_grad[0]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[5:]) if need]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_params = [torch.zeros_like(p) for p in wanted]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].detach().requires_grad_(want_hidden)
            with torch.set_grad_enabled(want_hidden or bool(wanted)):  # (a Function's forward runs without)
                logits = head(h)  # [chunk, V], in the dtype the model computes in
                loss = F.cross_entropy(logits.float(), targets[i:i + chunk], ignore_index=IGNORE,
                                       reduction="sum", label_smoothing=label_smoothing)
            inputs = ([h] if want_hidden else []) + wanted
            if inputs:
                grads = list(torch.autograd.grad(loss, inputs))
                if want_hidden:
                    grad_hidden[i:i + chunk] = grads.pop(0)
                for acc, g in zip(grad_params, grads):
                    acc += g
            total += loss.detach()
        ctx.save_for_backward(*([grad_hidden] if want_hidden else []), *grad_params)
        ctx.want_hidden, ctx.wanted = want_hidden, [bool(n) for n in ctx.needs_input_grad[5:]]
        return total

    @staticmethod
    def backward(ctx, grad):
        saved = [g * grad for g in ctx.saved_tensors]
        grad_hidden = saved.pop(0) if ctx.want_hidden else None
        return (grad_hidden, None, None, None, None, *[saved.pop(0) if w else None for w in ctx.wanted])


class HeadLoss:
    """The mean cross-entropy of a model's output against targets, through its `lm_head` in chunks (see the
    module's docstring); a model without one (the bigram) gets F.cross_entropy of its logits."""

    def __init__(self, model, chunk=CHUNK):
        self.chunk = chunk
        self.targets = self.label_smoothing = self.reduction = None
        self.head = getattr(model, "lm_head", None)
        if isinstance(self.head, nn.Module):
            self.head.forward = self._forward(self.head.forward)
        else:
            self.head = None

    def _forward(self, logits_of):
        @torch.compiler.disable  # a compiled model runs its head eagerly: the loop above is no graph to trace
        def forward(hidden):
            if self.targets is None:  # not inside a loss call: the logits, as always
                return logits_of(hidden)
            total = _HeadCrossEntropy.apply(hidden.flatten(0, -2), self.targets, logits_of, self.label_smoothing,
                                            self.chunk, *self.head.parameters())
            return total / (self.targets != IGNORE).sum() if self.reduction == "mean" else total
        return forward

    def __call__(self, net, x, y, label_smoothing=0.0, reduction="mean"):
        """net(x)'s loss against y [B, T] (net: the model, or DDP / torch.compile around it): the mean over
        the targets that are not IGNORE, or their sum."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        if self.head is None:
            return F.cross_entropy(net(x).float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                   reduction=reduction, label_smoothing=label_smoothing)
        self.targets, self.label_smoothing, self.reduction = y.flatten(), label_smoothing, reduction
        try:
            return net(x)
        finally:
            self.targets = None
