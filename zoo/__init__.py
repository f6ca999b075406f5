"""zoo: single-file PyTorch language models and the small amount of shared code around them.

    import zoo
    zoo.list()                                            # preset names
    model = zoo.load("shakespeare-char")                  # a fresh model from a preset
    model, tok = zoo.load_source("smollm2-135m-instruct") # published weights and their tokenizer
    print(zoo.complete(model, tok, [{"role": "user", "content": "Hi!"}], max_new_tokens=50))
    zoo.train("shakespeare-char", ["input.txt"], "out/", max_iters=2000)   # -> final validation loss
    zoo.fill_mask(model, tok, "To be or not to <|mask|>e")  # a model trained with objective="mlm"
    zoo.trace(model, idx, ["model.layers.*"])             # activations by module path (zoo/inspection.py)

Notes go to logging.getLogger("zoo") (stderr by default; set its level to WARNING to silence them).
"""
from . import engine, prepack, quantization, registry, sources  # (zoo.engine.Engine, zoo.prepack.prepack: README)
from .adapters import add_lora, merge_lora, save_adapter
from .export import save_gguf, save_gguf_adapter
from .generation import complete, generate
from .inspection import intervene, logit_lens, trace
from .mlm import fill_mask
from .pretrained import save_pretrained
from .quantization import quantize
from .registry import arch_of, build, list  # noqa: A004  (zoo.list() is the public name)
from .sampling import SamplingConfig
from .scoring import score, score_rolling
from .sources import from_pretrained, load_source
from .tokenizers import load_tokenizer as tokenizer
from .training import TrainConfig, train
from .verification import verify

__all__ = ["list", "load", "build", "arch_of", "from_pretrained", "load_source", "save_pretrained", "save_gguf",
           "save_gguf_adapter", "tokenizer",
           "generate", "complete", "SamplingConfig", "score", "score_rolling", "train", "TrainConfig", "verify",
           "fill_mask", "quantize", "add_lora", "merge_lora", "save_adapter", "trace", "intervene", "logit_lens"]


def load(name, pretrained=False, *, revision=None, device=None, dtype=None, quantize=None, **overrides):
    """Build the model a preset names; `pretrained=True` also loads its published weights.

    Overrides change config fields: zoo.load("gpt2", n_layer=2) (with pretrained=True, only fields
    that keep the tensors' shapes, such as dropout). quantize: "int8" or "int4" (see zoo.quantize),
    or with pretrained GGUF weights "native" (see zoo.from_pretrained).
    """
    preset = registry.get_preset(name)
    if pretrained:
        return from_pretrained(name, revision=revision, device=device, dtype=dtype, quantize=quantize, **overrides)
    if device is not None or dtype is not None:  # checked before the build
        device, dtype = sources.as_device(device), sources.as_dtype(dtype)
    model = build(preset.arch, {**preset.config, **overrides})
    model = model.to(device=device, dtype=dtype) if (device or dtype) else model
    if quantize is not None:
        model = quantization.quantize(model, quantize, dtype=dtype)  # (the argument hides zoo.quantize)
    return model
