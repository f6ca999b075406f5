"""The loss without the whole logits: cross-entropy and log-probabilities through the output layer, a chunk of
positions at a time (`zoo.train`'s loss for every model but those whose batch has few logits in all, a character
vocabulary's: F.cross_entropy there, see HeadLoss; zoo/preference.py's log-probabilities of answers).

A language model's last layer maps each position's hidden state [C] to logits over the vocabulary [V].
For SmolLM2 (V = 49,152) a batch of 8 x 256 positions makes 2048 x 49,152 logits: 200 MB in bf16, 400 MB
as the float32 the loss is computed in, 400 MB more that the log-softmax keeps for the backward pass,
and as much again for their gradient: at a LoRA step's peak, more than the rest of the activations.
Here the loss of each chunk of positions is computed together with its gradient, in the forward pass:
the loss ends the graph, so its gradient is known before the backward pass starts (the idea of
Liger-Kernel's fused linear cross-entropy). One chunk's logits exist at a time, none is kept, none is
recomputed; the backward pass only scales the gradients already computed. Same loss and gradients as
F.cross_entropy(head(hidden).float(), targets) (the chunks' sums added in another order: a test).

The model is used through its contract (models/__init__.py), never changed: `model(x, hidden=True)` gives the
final hidden state and `model.logits(h)` the logits of any of its positions, with lm_head's parameters (DDP,
FSDP and torch.compile wrap the forward pass; the chunks run eagerly after it).

    loss_fn = HeadLoss(model)
    loss = loss_fn(net, x, y)                  # mean over the targets that are not IGNORE (net: the model, DDP...)
    total = loss_fn(model, x, y, reduction="sum", label_smoothing=0.1)   # F.cross_entropy's options
    logp = target_logps(model, h, targets)     # log p of each target [K] from hidden states h [K, C]

Per-target log-probabilities (`target_logps`, what DPO sums per answer) meet their gradient only in the
backward pass, one number per target: each chunk's gradient of the hidden state is still computed in the
forward pass and scaled per target then, but a trainable output layer's gradient, a sum over targets, cannot
be: for it the backward pass computes each chunk's logits again.
"""
import torch
import torch.nn.functional as F

from .data import IGNORE

CHUNK_LOGITS = 512 * 49_152  # logits per chunk: 100 MB in float32 (512 positions of SmolLM2's vocabulary)
SMALL_LOGITS = 1 << 20  # a batch's logits up to 4 MB in float32: F.cross_entropy, whose copies cost nothing there
# (shakespeare-char's 768 x 65: a training step 35.1 -> 32.7 ms on 2 EPYC cores, the written-out gradient's
# small operators and second autograd pass costing more than they save)


def chunk_size(model):
    """Positions per chunk for `model`: as many as CHUNK_LOGITS logits hold, and at least 512, so that a small
    vocabulary's batch is one chunk (each chunk costs its own head matmul and gradient pass)."""
    return max(512, CHUNK_LOGITS // model.config.vocab_size)


def _cross_entropy(logits, targets, label_smoothing, want_grad, scale=None):
    """F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none", label_smoothing=...) [n]
    (0 where ignored) and, if wanted, the gradient of its sum (weighted by scale [n], if given) with respect to the
    logits (in their dtype), written out: in place over one float32 copy of the logits [n, V], where autograd's
    log-softmax and NLL would allocate four, and in as few passes over it as the arithmetic allows (at 100 MB a
    chunk, each pass costs about 10 ms here)."""
    eps = label_smoothing  # (PyTorch's: the target's (1 - eps) of the mass, the uniform's eps)
    z = logits.to(torch.float32, copy=True)  # [n, V]
    valid = targets != IGNORE  # [n]
    target = targets.masked_fill(~valid, 0)[:, None]  # [n, 1] (any other negative target: gather raises)
    z.sub_(z.amax(-1, keepdim=True))  # logits - their max (the loss is the same; exp cannot overflow)
    z_target = z.gather(1, target)[:, 0]  # [n]
    z_mean = z.mean(-1) if eps else 0.0  # [n]
    total = z.exp_().sum(-1)  # [n]; z is exp(z) from here
    # -log p(target) = log sum exp z - z_target; smoothing mixes in the mean of -log p over the vocabulary
    losses = torch.where(valid, total.log() - (1 - eps) * z_target - eps * z_mean, 0)  # [n]
    if not want_grad:
        return losses, None
    # softmax - (1 - eps) onehot - eps / V; ignored rows all zero (divided by an infinite total)
    grad = z.div_(torch.where(valid, total, torch.inf)[:, None])
    grad.scatter_add_(1, target, torch.where(valid, eps - 1, 0.0).to(z.dtype)[:, None])
    if eps:
        grad.sub_(valid[:, None].to(z.dtype) * (eps / z.shape[-1]))
    if scale is not None:
        grad.mul_(scale[:, None])
    return losses, grad.to(logits.dtype)


def _chunks(hidden, targets, head, label_smoothing, chunk, want_hidden, params, scale=None):
    """(losses [N] float32, the gradient of hidden [N, C] or None, float32 gradients of params) of the
    cross-entropy of head(hidden) against targets, one chunk of rows at a time; the gradients are those of the
    losses' sum, weighted by scale [N] if given."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    # The chunks' gradients are added in float32, as one GEMM over all rows would (a bf16 head: FSDP's).
    grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(0, hidden.shape[0], chunk):
        h = hidden[i:i + chunk].detach().requires_grad_(want_hidden)
        inputs = ([h] if want_hidden else []) + params
        with torch.set_grad_enabled(bool(inputs)):  # (a Function's forward and backward run without)
            logits = head(h)  # [chunk, V], in the dtype the model computes in
        losses[i:i + chunk], grad_logits = _cross_entropy(logits.detach(), targets[i:i + chunk], label_smoothing,
                                                          bool(inputs), None if scale is None else scale[i:i + chunk])
        if inputs:
            grads = list(torch.autograd.grad(logits, inputs, grad_logits))
            if want_hidden:
                grad_hidden[i:i + chunk] = grads.pop(0)
            for acc, g in zip(grad_params, grads):
                acc += g
    return losses, grad_hidden, grad_params


class _HeadCrossEntropy(torch.autograd.Function):
    """The cross-entropy of head(hidden) [N, V] against targets [N], one chunk of rows at a time: summed, or per
    row [N] (per_row). Its gradients with respect to hidden and the head's parameters are computed in the forward
    pass and scaled by the backward pass's incoming gradient; per row, the parameters' are computed in the backward
    pass instead (they need every row's own scale). Once: the graph cannot be kept for a second backward pass."""

    @staticmethod
    def forward(ctx, hidden, targets, head, label_smoothing, chunk, grad_enabled, per_row, *params):  # hidden [N, C]
        # needs_input_grad says which inputs require a gradient, not whether gradients are on: under
        # torch.no_grad (evaluation) a trainable head must not cost its gradient.
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        ctx.wants = [grad_enabled and need for need in ctx.needs_input_grad[7:]]
        wanted = [p for p, want in zip(params, ctx.wants) if want]
        ctx.per_row, ctx.deferred, ctx.want_hidden, ctx.used = per_row, per_row and bool(wanted), want_hidden, False
        if ctx.deferred:  # the backward pass runs the chunks again, as this pass does (in its autocast)
            device = hidden.device.type
            ctx.head, ctx.params, ctx.options = head, wanted, (label_smoothing, chunk)
            ctx.autocast = device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)
            ctx.save_for_backward(hidden, targets)
            losses = _chunks(hidden, targets, head, label_smoothing, chunk, False, [])[0]
        else:
            losses, grad_hidden, grad_params = _chunks(hidden, targets, head, label_smoothing, chunk, want_hidden,
                                                       wanted)
            ctx.save_for_backward(*([grad_hidden] if want_hidden else []), *grad_params)
            ctx.dtypes = [p.dtype for p in wanted]
        return losses if per_row else losses.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("the chunked loss's gradients were already used: its backward pass runs once "
                               "(retain_graph is not supported)")
        ctx.used = True
        if ctx.deferred:
            hidden, targets = ctx.saved_tensors
            device, dtype, enabled = ctx.autocast
            with torch.autocast(device, dtype, enabled=enabled):
                _, grad_hidden, grad_params = _chunks(hidden, targets, ctx.head, *ctx.options, ctx.want_hidden,
                                                      ctx.params, scale=grad)
            grad_params = [g.to(p.dtype) for g, p in zip(grad_params, ctx.params)]
        else:
            scale = grad[:, None] if ctx.per_row else grad  # ([N, 1] per row: then there are no parameters' here)
            saved = [g.mul_(scale) for g in ctx.saved_tensors]  # in place: the weight's gradient can be 100s of MB
            grad_hidden = saved.pop(0) if ctx.want_hidden else None
            grad_params = [g.to(dtype) for g, dtype in zip(saved, ctx.dtypes)]
        return (grad_hidden, None, None, None, None, None, None,
                *[grad_params.pop(0) if want else None for want in ctx.wants])


def head_of(model):
    """(the function from the final hidden state to logits, its parameters): the model's `logits` and lm_head's
    parameters (models/__init__.py); for a model without (the bigram, whose forward gives logits) the identity."""
    if callable(getattr(model, "logits", None)):
        return model.logits, list(model.lm_head.parameters())
    return (lambda h: h), []


def hidden_state(net, model, x, **forward_kwargs):
    """The final hidden state [B, T, C] of x [B, T] by net (the model, or DDP / torch.compile around it): what
    head_of(model)'s function maps to logits (for a model without `logits`, its logits themselves)."""
    hidden = {"hidden": True} if callable(getattr(model, "logits", None)) else {}
    return net(x, **forward_kwargs, **hidden)


def target_logps(model, hidden, targets, chunk=None):
    """log p of each target [K] (none IGNORE) in float32 under model.logits(hidden), one chunk of positions at a
    time; differentiable (see the module's docstring). hidden [K, C]: positions of hidden_state's output, taken
    before this call (FSDP registers the gathered output layer in the model during its forward pass)."""
    head, params = head_of(model)
    return -_HeadCrossEntropy.apply(hidden, targets, head, 0.0, chunk or chunk_size(model), torch.is_grad_enabled(),
                                    True, *params)


class HeadLoss:
    """The mean cross-entropy of a model's output against targets, through its `logits` in chunks (see the
    module's docstring); a model without one (the bigram) has its logits' cross-entropy computed in chunks. A batch
    of few logits in all (SMALL_LOGITS, one chunk) takes F.cross_entropy instead."""

    def __init__(self, model, chunk=None):
        self.model, self.chunk = model, chunk or chunk_size(model)

    def __call__(self, net, x, y, label_smoothing=0.0, reduction="mean"):
        """net(x)'s loss against y [B, T] (net: the model, or DDP / torch.compile around it): the mean over
        the targets that are not IGNORE, or their sum."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        hidden = hidden_state(net, self.model, x).flatten(0, -2)  # [B T, C]
        head, params = head_of(self.model)  # after the forward pass: FSDP registers its gathered parameters in it
        if hidden.shape[0] <= self.chunk and hidden.shape[0] * self.model.config.vocab_size <= SMALL_LOGITS:
            # one small chunk (a character vocabulary's batch): autograd's log-softmax and NLL, faster there
            total = F.cross_entropy(head(hidden).float(), y.flatten(), ignore_index=IGNORE,
                                    label_smoothing=label_smoothing, reduction="sum")
        else:
            total = _HeadCrossEntropy.apply(hidden, y.flatten(), head, label_smoothing, self.chunk,
                                            torch.is_grad_enabled(), False, *params)
        return total / (y != IGNORE).sum() if reduction == "mean" else total
