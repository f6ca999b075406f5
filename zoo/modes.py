"""A model in eval mode for a while: generation, scoring and evaluation switch dropout (and every other
training-time behaviour) off, and give the model back in the mode it came in. And the prompt mode, in which a
model reads a prompt (a prefill)."""
import contextlib
import contextvars

_PROMPT = contextvars.ContextVar("zoo_prompt", default=False)


@contextlib.contextmanager
def eval_mode(model):
    """Inside, every module of `model` is in eval mode; on leaving, the modules that were in training mode
    are again. Only those are touched: model.eval() sets every module's flag, ~2 ms per call on a 30-layer
    model, which a decode step of a small model would notice."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield model
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def prompt_mode():
    """Inside, the model is reading prompts (prefilling the cache): a quantized layer that keeps a float copy of its
    matrix for that (zoo/prepack.py) multiplies by it. Decoding steps and speculative checks run outside, on the
    kernels' own products, the same for a row in a batch as alone and for one new token as for several, so that
    batching and speculation leave greedy tokens as they are."""
    token = _PROMPT.set(True)
    try:
        yield
    finally:
        _PROMPT.reset(token)


def in_prompt():
    return _PROMPT.get()
