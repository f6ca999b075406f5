"""A model in eval mode for a while: generation, scoring and evaluation switch dropout (and every other
training-time behaviour) off, and give the model back in the mode it came in."""
import contextlib


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
