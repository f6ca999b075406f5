"""zoo: single-file PyTorch language models and the small amount of shared code around them.

    import zoo
    zoo.list()                                            # preset names
    model = zoo.load("shakespeare-char")                  # a fresh model from a preset
    model, tok = zoo.load_source("smollm2-135m-instruct") # published weights and their tokenizer
    print(zoo.complete(model, tok, [{"role": "user", "content": "Hi!"}], max_new_tokens=50))
    zoo.train("shakespeare-char", ["input.txt"], "out/", max_iters=2000)   # -> final validation loss

Notes go to logging.getLogger("zoo") (stderr by default; set its level to WARNING to silence them).
"""
from .adapters import add_lora, merge_lora, save_adapter
from .generation import complete, generate
from .pretrained import from_pretrained, load_source, save_pretrained
from .registry import arch_of, build, list  # noqa: A004  (zoo.list() is the public name)
from .sampling import SamplingConfig
from .tokenizers import load_tokenizer as tokenizer
from .training import TrainConfig, train
from .verification import verify

__all__ = ["list", "load", "build", "arch_of", "from_pretrained", "load_source", "save_pretrained", "tokenizer",
           "generate", "complete", "SamplingConfig", "train", "TrainConfig", "verify",
           "add_lora", "merge_lora", "save_adapter"]


def load(name, pretrained=False, *, revision=None, device=None, dtype=None, **overrides):
    """Build the model a preset names; `pretrained=True` also loads its published weights.

    Overrides change config fields: zoo.load("gpt2", n_layer=2) (with pretrained=True, only fields
    that keep the tensors' shapes, such as dropout).
    """
    from .registry import get_preset
    preset = get_preset(name)
    if pretrained:
        return from_pretrained(name, revision=revision, device=device, dtype=dtype, **overrides)
    model = build(preset.arch, {**preset.config, **overrides})
    return model.to(device=device, dtype=dtype) if (device or dtype) else model
