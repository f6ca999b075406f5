"""Inspection: what a zoo model computes inside, read and changed through forward hooks on its own modules.

    acts = zoo.trace(model, idx, ["model.layers.*"])        # each block's output: the residual stream
    acts = zoo.trace(model, idx, ["model.layers.3.self_attn"], attention=True)
    acts["model.layers.3.self_attn.pattern"]                # softmax probabilities [B, heads, query, key]
    with zoo.intervene(model, {"model.layers.3.self_attn.attend": zero_heads(5)}):
        zoo.generate(model, idx, max_new_tokens=20)          # head 5 of layer 3 ablated, during generation too
    lens = zoo.logit_lens(model, idx)                       # [n_layer + 1, B, T, vocab_size]

Names are module paths, as model.named_modules() gives them (the files keep Hugging Face's names, so the same
across architectures that share them), with `*` standing for one path component. A path names the module's
output; `<path>.input` names its first argument (a block's input is the residual stream before it);
`<attention path>.pattern` names the attention probabilities, recomputed from what the attention module passes
its `attend` child (the convention in models/__init__.py), so a forward that does not ask pays nothing for them.
Hooks are removed when the call or the `with` block ends, an exception included.
"""
import contextlib
import fnmatch
import inspect

import torch
import torch.nn as nn


def blocks(model):
    """(path, the nn.ModuleList of blocks): the model's first ModuleList."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            return path, module
    raise ValueError(f"{type(model).__module__}.{type(model).__name__} has no nn.ModuleList of blocks to inspect")


def final_norm(model):
    """The norm the model applies before lm_head: the last module of the container that holds the blocks."""
    path, _ = blocks(model)
    container = model.get_submodule(path.rpartition(".")[0])
    return list(container.children())[-1]


def hook_points(model):
    """{name: (module, kind)} for every name trace and intervene accept: each module's path (kind "output"),
    `<path>.input` ("input") and each attention module's `<path>.pattern` ("pattern")."""
    points = {}
    for path, module in model.named_modules():
        if path:
            points[path], points[f"{path}.input"] = (module, "output"), (module, "input")
            if isinstance(getattr(module, "attend", None), nn.Module):
                points[f"{path}.pattern"] = (module, "pattern")
    return points


def _match(model, globs, what):
    """{name: (module, kind)} for the names the globs select (hook_points); every glob must select something."""
    if isinstance(globs, str):
        globs = [globs]
    if not globs or not all(isinstance(g, str) for g in globs):
        raise ValueError(f"{what}: names must be a non-empty list of module paths (globs), not {globs!r}")
    points, selected = hook_points(model), {}
    for glob in globs:
        parts = glob.split(".")
        hits = [n for n in points if len(n.split(".")) == len(parts)
                and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), parts))]
        if not hits:
            stem, near = glob.split("*")[0].rpartition(".")[0], []
            while not near:  # the names under the longest start of the glob that names any
                near = [n for n in points if n.startswith(stem) and not n.endswith(".input")][:8]
                if not stem:
                    break
                stem = stem.rpartition(".")[0]
            raise ValueError(f"{what}: {glob!r} names no module of this {type(model).__name__} (`*` stands for "
                             f"one path component); names look like: {', '.join(near)}")
        selected.update((n, points[n]) for n in hits)
    return selected


def attention_pattern(attend, args, kwargs):
    """The softmax probabilities [B, H, T, S] (fp32) of one call attend(q, k, v, mask, causal, ..., scale=None,
    softcap=None), recomputed from its arguments (see models/__init__.py)."""
    a = inspect.signature(attend.forward).bind(*args, **kwargs).arguments
    q, k, mask = a["q"].float(), a["k"].float(), a["mask"]  # [B, H, T, D], [B, H_kv, S, D], [B|1, 1, T, S]
    (T, D), S = q.shape[-2:], k.size(-2)
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # query head h reads key head h // (H / H_kv)
    scale = a.get("scale")
    scores = q @ k.transpose(-2, -1) * (D ** -0.5 if scale is None else scale)  # [B, H, T, S]
    if (cap := a.get("softcap")) is not None:
        scores = cap * torch.tanh(scores / cap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    elif a["causal"]:  # SDPA's is_causal: query i sees keys 0..i
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1)


@torch.no_grad()
def trace(model, idx, names=None, attention=False, **forward_kwargs):
    """The named activations of one forward pass model(idx, **forward_kwargs), {name: tensor}, detached.

    names: module paths with `*` globs (see the module's docstring), default every block's output (the residual
    stream after each block). Only what they select is kept. attention=True adds `<path>.pattern` [B, H, T, S]
    for each attention module among or inside the selected modules (e.g. names=["model.layers.2"]).
    """
    if names is None:
        names = [f"{blocks(model)[0]}.*"]
    wanted = _match(model, names, "trace")
    if attention:
        inside = tuple(n + "." for n, (_, kind) in wanted.items() if kind == "output")
        patterns = [n for n, (_, kind) in hook_points(model).items()
                    if kind == "pattern" and (n[:-len("pattern")]).startswith(inside)]
        if not patterns:
            raise ValueError(f"trace: attention=True, but no attention module is among or inside {names!r}")
        wanted.update(_match(model, patterns, "trace"))
    vocab_size = model.config.vocab_size  # (the model files leave this check out: it would cost a device sync)
    if torch.is_tensor(idx) and idx.numel() and not idx.is_floating_point() and \
            not 0 <= int(idx.min()) <= int(idx.max()) < vocab_size:
        raise ValueError(f"trace: idx has token ids outside the model's vocabulary [0, {vocab_size})")
    acts, handles = {}, []

    def keep(name, value):
        acts[name] = value.detach() if isinstance(value, torch.Tensor) else value

    try:
        for name, (module, kind) in wanted.items():
            if kind == "output":
                handles.append(module.register_forward_hook(lambda m, args, out, name=name: keep(name, out)))
            elif kind == "input":
                handles.append(module.register_forward_pre_hook(lambda m, args, name=name: keep(name, args[0])))
            else:
                handles.append(module.attend.register_forward_pre_hook(
                    lambda m, args, kwargs, name=name: keep(name, attention_pattern(m, args, kwargs)),
                    with_kwargs=True))
        model(idx, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return acts


@contextlib.contextmanager
def intervene(model, edits):
    """Inside the block, each named module's output becomes fn(output) (`<path>.input`: its first argument
    becomes fn(input)), in every forward pass, zoo.generate's included; fn returning None keeps the value
    (edited in place). edits: {name or glob: fn}. Undone when the block ends, an exception included.

        with zoo.intervene(model, {"model.layers.5": lambda x: x + steering}):   # a steering vector
            ...
    """
    if not isinstance(edits, dict) or not edits:
        raise ValueError(f"intervene: edits must be a non-empty dict {{module path: fn}}, not {edits!r}")
    handles = []
    try:
        for glob, fn in edits.items():
            if not callable(fn):
                raise TypeError(f"intervene: the edit for {glob!r} must be a function of the activation, not "
                                f"{type(fn).__name__}")
            for name, (module, kind) in _match(model, glob, "intervene").items():
                if kind == "output":
                    handles.append(module.register_forward_hook(lambda m, args, out, fn=fn: fn(out)))
                elif kind == "input":
                    handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: _first(args, fn(args[0]))))
                else:
                    raise ValueError(f"intervene: {name} is computed for reading (zoo.trace), never used; to change "
                                     f"what attention does, edit {name[:-len('pattern')]}attend (its output "
                                     "[B, H, T, D], per head) or the attention's input")
        yield model
    finally:
        for h in handles:
            h.remove()


def _first(args, value):
    return None if value is None else (value, *args[1:])


def zero_heads(*heads):
    """An intervene edit for an `attend` module (output [B, H, T, D]): zero these heads' outputs (ablation)."""
    def edit(y):
        if not all(0 <= h < y.shape[1] for h in heads):  # (an index error deep in a forward pass would not say)
            raise ValueError(f"zero_heads{heads}: this attention's heads are 0..{y.shape[1] - 1}")
        y = y.clone()
        y[:, list(heads)] = 0
        return y
    return edit


@torch.no_grad()
def logit_lens(model, idx, **forward_kwargs):
    """Logits [n_layer + 1, B, T, vocab_size] read off the residual stream: row 0 from the embeddings (the first
    block's input), row i from block i-1's output, each through the final norm and lm_head (before any final
    soft-capping the model applies); the last row is the model's own logits."""
    path, layers = blocks(model)
    names = [f"{path}.0.input"] + [f"{path}.{i}" for i in range(len(layers))]
    acts = trace(model, idx, names, **forward_kwargs)
    norm = final_norm(model)
    return torch.stack([model.lm_head(norm(acts[n])) for n in names])
