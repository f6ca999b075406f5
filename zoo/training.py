"""Training: one loop for every model in the zoo, from scratch or from pretrained weights.

    zoo.train("shakespeare-char", ["input.txt"], "out/", tokenizer="char", max_iters=2000)  # -> val loss
    zoo train shakespeare-char --data input.txt --tokenizer char --out out/                # the same
    torchrun --nproc_per_node=2 -m zoo train ...     # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Settings are a TrainConfig: its defaults, under the preset's `train` settings, under the fields the
caller gives. Every `checkpoint_interval` steps and at the end, OUT/step-NNNNNNN/ receives the weights
(save_pretrained, so from_pretrained and `zoo eval` read it) and training_state.pt (optimizer, schedule,
RNG states, data position, settings), so `resume=True` continues exactly where the run stopped (the
output folder and its checkpoints: zoo/runs.py).

`train` is the run's steps in order, each a function of what it is given: settings -> start_processes ->
make_model -> choose_tokenizer -> load_data -> prepare_run -> fit, whose loop is made of optimizer_step,
learning_rate, validate, runs.save_checkpoint, Budget (the time budget's plan) and Log.
"""
import dataclasses
import inspect
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import adapters, chat_data, data, mlm, preference, runs, tokenizers
from .distributed import (Distributed, checkpoint_blocks, gradient_sync, load_optimizer_state, shard,
                          wrap)
from .loss import HeadLoss
from .modes import eval_mode
from .progress import bar as progress_bar
from .progress import log as note
from .quantization import native_bf16
from .registry import arch_of, build, get_preset
from .routing import RouterLoss
from .sources import as_device, from_pretrained, own_tokenizer, source_path, write_merged


def _setting(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """The training settings, with their defaults and one line of help each (the `zoo train` flags are
    made from these). Impossible values raise ValueError naming the field."""
    tokenizer: str | None = _setting(None, "char, gpt2, bpe (trained on the data) or a tokenizer file/folder "
                                           "(default: the preset's, or the --init source's own)", type=str)
    max_iters: int | None = _setting(None, "optimizer steps (default 5000; with a time budget, as many as fit)",
                                     type=int)
    batch_size: int = _setting(12, "sequences per micro-batch and process", type=int)
    block_size: int | None = _setting(None, "tokens per sequence (default: the model's block_size, at most 1024)",
                                      type=int)
    grad_accum: int | None = _setting(None, "micro-batches per step, in total over all processes (default: one "
                                            "per process)", type=int)
    lr: float = _setting(6e-4, "peak learning rate (noam: the scale factor)", type=float)
    min_lr: float | None = _setting(None, "cosine floor (default lr/10)", type=float)
    schedule: str = _setting("cosine", "warmup then cosine decay to min_lr; noam: inverse square root; "
                                       "constant: warmup then lr", type=str, choices=("cosine", "noam", "constant"))
    warmup: int = _setting(100, "warmup steps", type=int)
    weight_decay: float = _setting(0.1, "AdamW weight decay of matrices and embeddings", type=float)
    beta1: float = _setting(0.9, "AdamW beta1", type=float)
    beta2: float = _setting(0.95, "AdamW beta2", type=float)
    grad_clip: float = _setting(1.0, "clip the gradient norm to this (0: off)", type=float)
    label_smoothing: float = _setting(0.0, "label smoothing of the cross-entropy; dpo: the chance that a pair's "
                                           "labels are flipped (cDPO, below 0.5)", type=float)
    # the objective: next-token prediction, masked language modelling (zoo/mlm.py), preferences (preference.py)
    objective: str = _setting("causal", "causal: predict the next token; mlm: masked language modelling (BERT's "
                                        "recipe; bidirectional attention unless --set causal=true); dpo: preference "
                                        "tuning on {prompt, chosen, rejected} pairs", type=str,
                              choices=("causal", "mlm", "dpo"))
    beta: float = _setting(0.1, "dpo: how far the model may move from the reference (the rewards' scale; IPO's "
                                "regularisation)", type=float)
    dpo_loss: str = _setting("sigmoid", "dpo: sigmoid (DPO; cDPO with --label-smoothing) or ipo", type=str,
                             choices=preference.LOSSES)
    dpo_reference: str = _setting("live", "dpo: the reference model's log-probabilities computed each step (LoRA: "
                                          "adapters off; else a frozen copy), or precomputed for every pair before "
                                          "training (no copy)", type=str, choices=preference.REFERENCES)
    mask_prob: float = _setting(mlm.MASK_PROB, "mlm: the share of tokens selected for prediction (then "
                                                   "80/10/10: masked, a random token, unchanged)", type=float)
    eval_interval: int = _setting(250, "steps between validation losses", type=int)
    eval_iters: int = _setting(20, "validation batches per evaluation", type=int)
    log_interval: int = _setting(10, "steps between log lines", type=int)
    checkpoint_interval: int = _setting(1000, "steps between checkpoints", type=int)
    seed: int = _setting(1337, "seed of every random number generator the run uses", type=int)
    bf16: bool = _setting(False, "bfloat16 autocast (CPU and CUDA)", type=bool)
    compile: bool = _setting(False, "torch.compile the model", type=bool)
    device: str | None = _setting(None, "cpu, cuda, cuda:1, ... (default: cuda when available)", type=str)
    time_budget: float | None = _setting(None, "wall time of the whole run in seconds; the schedule's horizon "
                                               "follows the measured step time", type=float)
    progress: bool = _setting(True, "show a progress bar on stderr", type=bool)
    fsdp: bool = _setting(False, "under torchrun: shard parameters, gradients and optimizer state across the "
                                 "processes (FSDP2) instead of copying them (DDP)", type=bool)
    grad_checkpoint: bool = _setting(False, "recompute each block's activations in the backward pass (less "
                                            "memory, ~1/3 more compute)", type=bool)
    # LoRA (zoo/lora.py, zoo/adapters.py): adapters on a frozen --init model; checkpoints hold the adapter
    lora_r: int = _setting(0, "LoRA rank: train low-rank adapters on the frozen --init weights (0: train every "
                              "weight)", type=int, aliases=("--lora",))
    lora_alpha: float | None = _setting(None, "LoRA alpha: the adapters' output is scaled by alpha / rank "
                                              "(default 2 x rank)", type=float)
    lora_dropout: float = _setting(0.0, "dropout on the adapters' input", type=float)
    lora_targets: str | None = _setting(None, "comma-separated layer-name patterns to adapt, ours or the "
                                              "checkpoint's (qkv_proj; q_proj,v_proj; model.layers.2?.*) "
                                              "(default: every attention and MLP projection)", type=str)
    lora_int8: bool = _setting(False, "LoRA over the base quantized to int8 (weight-only, bfloat16 compute; float32 "
                                      "on a CPU without bf16 arithmetic): the frozen weights take a quarter of "
                                      "float32's memory", type=bool)
    merge: bool = _setting(False, "with LoRA: at the end, also write OUT/merged, the base with the adapter "
                                  "folded in (a full model that transformers loads)", type=bool)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.metadata["type"]
            if value is None and f.default is None:
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError(f"TrainConfig.{f.name} must be {kind.__name__}, not {type(value).__name__} "
                                f"{value!r}")
            if kind is float and not math.isfinite(value):
                raise ValueError(f"TrainConfig.{f.name} must be a finite number, not {value}")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"TrainConfig.{f.name} must be one of {', '.join(f.metadata['choices'])}, "
                                 f"not {value!r}")

        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {what}, not {getattr(self, name)}")

        for name in ("batch_size", "eval_interval", "eval_iters", "log_interval", "checkpoint_interval"):
            need(getattr(self, name) >= 1, name, "at least 1")
        for name in ("max_iters", "block_size", "grad_accum"):
            need(getattr(self, name) is None or getattr(self, name) >= 1, name, "at least 1 (or None)")
        need(self.lr > 0, "lr", "> 0")
        need(self.min_lr is None or self.min_lr >= 0, "min_lr", ">= 0")
        need(self.warmup >= (1 if self.schedule == "noam" else 0), "warmup",
             "at least 1 with the noam schedule" if self.schedule == "noam" else ">= 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", ">= 0 (0: off)")
        need(0 <= self.label_smoothing < (0.5 if self.objective == "dpo" else 1), "label_smoothing",
             "in [0, 0.5) with dpo" if self.objective == "dpo" else "in [0, 1)")
        need(self.beta > 0, "beta", "> 0")
        need(self.time_budget is None or self.time_budget > 0, "time_budget", "> 0 seconds (or None)")
        need(0 < self.mask_prob <= 1, "mask_prob", "in (0, 1]")
        need(self.lora_r >= 0, "lora_r", ">= 0 (0: no LoRA)")
        need(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "> 0 (or None: 2 x rank)")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        for name in ("lora_targets", "lora_int8", "merge"):
            need(self.lora_r or not getattr(self, name), name, "left unset without LoRA (set lora_r, --lora RANK)")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"TrainConfig.device: {self.device!r} is not a device (cpu, cuda, cuda:1, ...)") \
                    from None

    @classmethod
    def for_preset(cls, name, **fields):
        """The preset's tokenizer and training settings (a partial TrainConfig) over the defaults, then
        `fields`."""
        preset = get_preset(name)
        return cls.of(cls(), **{"tokenizer": preset.tokenizer, **preset.train, **fields})

    @classmethod
    def of(cls, base, **fields):
        """`base` with `fields` replaced; an unknown field name lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(fields) - known:
            raise TypeError(f"unknown training setting(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(sorted(known))}")
        return dataclasses.replace(base, **fields)


# ---------------------------------------------------------------------------------------- the run

def train(source, data_paths, out, *, val=None, init=None, resume=False, overwrite=False, overrides=None, config=None,
          **fields):
    """Train a model and return its final validation loss (on rank 0; None on the other ranks).

    source: a preset name (the model config and its training settings), or None with `init`.
    data_paths, val: lists of text files or `hf:` dataset specs; without `val` the last tenth of the
    data validates. out: the run's folder (checkpoints, log.jsonl, loss.png). init: start from the
    weights of any source load_source reads (the preset, if named too, then only gives the training settings).
    resume: continue from the newest intact checkpoint in `out`, with its settings (a larger max_iters continues
    up to it; a preset, override or kept setting given that differs from the run's is refused: check_resume,
    check_kept). A folder that holds a run, or other files, is refused unless resume (a run) or overwrite (which
    moves it aside to OUT.old-N once the settings, model and data have loaded; init and data inside it are
    refused). overrides: model config fields.
    config: a TrainConfig to start from instead of the preset's settings; fields: TrainConfig fields on top.
    """
    data_paths, val, out = _paths(data_paths), _paths(val), os.fspath(out)
    if not data_paths:
        raise ValueError("no training data: pass one or more text files (or hf: datasets)")
    if source is None and init is None and not resume:  # (a resumed run's checkpoint has its model)
        raise ValueError("name a preset (the model to build) or an init source (the weights to start from)")
    if resume and overwrite:
        raise ValueError(f"resume (--resume) continues the run in {out!r} and overwrite (--overwrite) moves it aside "
                         "to start again: give one of them")
    aside = runs.check_out(out, resume, overwrite, inputs=[init, *data_paths, *(val or [])])
    ckpt, state, resumed = runs.resume_point(out) if resume else (None, None, None)
    inputs = started_from(source, init, data_paths, val, overrides)
    if state:
        inputs = check_resume(out, ckpt, state, inputs)
    s = settings(source, config, fields, state)
    as_device(s.device)  # one this torch reaches (checked here, not in TrainConfig: a run may resume elsewhere)
    if state:
        check_kept(out, ckpt, state, s)
    dist = start_processes(s)
    model, init_tokenizer = make_model(s, source, init, overrides, resumed, dist.rank)
    tokenizer = choose_tokenizer(s.tokenizer, named="tokenizer" in fields, checkpoint=ckpt,
                                 init_tokenizer=init_tokenizer, preset=source, texts=data_paths + (val or []),
                                 vocab_size=model.config.vocab_size)
    if resumed is None and init is None and "vocab_size" not in (overrides or {}) \
            and isinstance(tokenizer, tokenizers.CharTokenizer) and tokenizer.vocab_size < model.config.vocab_size:
        # a fresh char model's vocabulary is its text's characters (as nanoGPT's meta.pkl sets it): rows past them
        # would never be trained, yet sampling could draw them, ids the tokenizer cannot decode (a preset's 65 rows
        # over a text of fewer characters). (Other tokenizers fill a preset's vocabulary, or its rows are padding.)
        if dist.rank == 0:
            note.info("zoo: vocab_size %d -> %d, the text's characters", model.config.vocab_size, tokenizer.vocab_size)
        del model
        overrides = {**(overrides or {}), "vocab_size": tokenizer.vocab_size}
        model, _ = make_model(s, source, init, overrides, resumed, dist.rank)
    if s.objective == "mlm":  # a mask token, and the model grown by its row when the vocabulary needs it
        mlm.add_mask_token(model, tokenizer)
    train_data, val_data = load_data(s, tokenizer, data_paths, val, model.config.vocab_size)
    run = prepare_run(model, s, train_data, val_data, dist, state, init, ckpt)
    if aside and dist.rank == 0:  # only now: bad settings, weights or data leave the earlier run where it was
        runs.move_aside(out)
    try:
        val_loss = fit(run, s, train_data, val_data, dist, out, tokenizer, inputs)
    finally:
        dist.close()
    if dist.rank == 0 and s.merge:
        write_merged(runs.latest_checkpoint(out), os.path.join(out, "merged"))
    return val_loss if dist.rank == 0 else None


def _paths(paths):
    """A path or a list of them as a list of strings (None stays None)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return None if paths is None else [os.fspath(p) for p in paths]


def started_from(source, init, data_paths, val, overrides):
    """What a run starts from, saved with its checkpoints for check_resume: the preset, the init source and the
    data files (local ones as real paths, so a resume from another folder names the same), and the config
    overrides."""
    def where(path):
        return os.path.realpath(path) if os.path.exists(path) else path
    return dict(preset=source, init=None if init is None else where(os.fspath(init)),
                data=[where(p) for p in data_paths], val=None if val is None else [where(p) for p in val],
                overrides=dict(overrides or {}))


# What makes a run what it is rather than how it trains: a resumed run keeps its checkpoint's tokenizer, objective,
# adapters and random streams whatever it is given, so a different value is refused (check_kept), not ignored.
# Training settings (lr, warmup, grad_clip, a larger max_iters, ...) given with resume replace the run's.
KEPT_ON_RESUME = ("tokenizer", "objective", "seed", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                  "lora_int8")


def check_resume(out, checkpoint, state, inputs):
    """The inputs a run resumed from `checkpoint` (its training state `state`) goes on saving. What the caller gave
    (`inputs`, started_from's) must agree with the run's: a preset or config override that differs is a ValueError
    naming each. Other data or validation files, or an init source (which a resumed run does not read), are named
    in a warning, not refused: a run moved to another folder or machine finds its data at other paths; the files
    given are what it trains on from here. (A checkpoint from before runs saved their inputs is checked on its
    config.)"""
    run = state.get("inputs", {})
    differ = []
    if "preset" in run and inputs["preset"] not in (None, run["preset"]):  # (a preset left out is the run's)
        differ.append(f"preset {inputs['preset']!r} (the run's: {run['preset']!r})")
    differ += [f"overrides (--set) {k}={v!r} (the run's: {state['config'].get(k)!r})"
               for k, v in inputs["overrides"].items()
               # (or the run's own override: an mlm run's mask token may have grown vocab_size past it)
               if v != state["config"].get(k) and v != run.get("overrides", {}).get(k)]
    if differ:
        raise ValueError(f"resume continues the run in {out!r} as it was, but these differ from it: "
                         f"{'; '.join(differ)}. Leave them out to continue it, or start a new run from its checkpoint "
                         f"in another folder (--init {checkpoint} --out NEW)")
    for key, what in (("init", "init (--init)"), ("data", "data (--data)"), ("val", "val (--val)")):
        # (an init left out is the run's; no val is a choice: the last tenth of the data validates)
        if key in run and inputs[key] != run[key] and (inputs[key] is not None or key == "val"):
            note.warning("zoo: resume: %s %s where the run had %s: %s", what, inputs[key], run[key],
                         "a resumed run continues from its checkpoint, not from init" if key == "init" else
                         "the run continues on these (the same data moved, or other data from here on)")
    return {**inputs, **run, "data": inputs["data"], "val": inputs["val"]}


def check_kept(out, checkpoint, state, s):
    """A run resumed from `checkpoint` keeps its KEPT_ON_RESUME settings: where its settings `s` (the run's, with
    what the caller gave on top) differ from `state`'s, a ValueError naming each."""
    differ = [f"{k} (--{k.replace('_', '-')}) {getattr(s, k)!r} (the run's: {state['settings'][k]!r})"
              for k in KEPT_ON_RESUME if k in state["settings"] and getattr(s, k) != state["settings"][k]]
    if differ:
        raise ValueError(f"resume continues the run in {out!r} as it was, but these settings differ from its own: "
                         f"{'; '.join(differ)}. Leave them out to continue it, or start a new run from its checkpoint "
                         f"in another folder (--init {checkpoint} --out NEW)")


def settings(source, config, fields, state=None):
    """The run's TrainConfig: `config`, else a resumed run's own settings (`state`'s), else the `source`
    preset's, else the defaults; `fields` on top. Then what is left open is filled in: min_lr (lr/10, and never
    above lr), max_iters (5000, unless a time budget sets the horizon) and the device (cuda when available); bf16
    autocast stays only where the device computes bf16 natively (CUDA, a CPU with AVX512-BF16 or AMX)."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, not {type(config).__name__}")
    asked_bf16 = fields.get("bf16", config is not None and config.bf16)  # (the caller's, not a preset's)
    if config is None and state:  # a resumed run keeps its own settings unless told otherwise
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in state["settings"].items() if k in known})
    elif config is None:
        config = TrainConfig.for_preset(source) if source is not None else TrainConfig()
    s = TrainConfig.of(config, **fields)
    # a preset's min_lr must not exceed a lower lr given by the caller: the decay never rises
    s.min_lr = s.lr / 10 if s.min_lr is None else min(s.min_lr, s.lr)
    if s.max_iters is None and not s.time_budget:  # with a time budget the budget sets the horizon
        s.max_iters = 5000
    s.device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if s.bf16 and not computes_bf16(s.device):
        # torch emulates bf16 there: its matmuls 3-4x slower than float32's on an AVX-512 CPU without BF16, ~6x on an
        # AVX2-only one (AMD Zen 3), where oneDNN has no bf16 kernels and torch's reference GEMM runs them. A preset's
        # bf16 is dropped quietly; one the caller asked for, saying so.
        if asked_bf16:
            note.warning("zoo: this CPU has no bfloat16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast runs "
                         "several times slower than float32: training in float32")
        s.bf16 = False
    return s


def computes_bf16(device):
    """Whether `device` computes bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX (quantization.native_bf16)."""
    return torch.device(device).type != "cpu" or native_bf16()


def start_processes(s):
    """torchrun's process group, or this one process (zoo/distributed.py). Settings `s` take the process's
    device and, unless given, one micro-batch per process per step (grad_accum)."""
    dist = Distributed(s.device)
    s.device = dist.device
    s.grad_accum = s.grad_accum or dist.world
    if s.grad_accum % dist.world:
        raise ValueError(f"grad_accum {s.grad_accum} must be a multiple of the {dist.world} processes")
    if s.fsdp and s.lora_r:
        raise ValueError("fsdp with LoRA is not supported yet: LoRA's frozen base and small adapters fit one "
                         "process; train LoRA with plain torchrun (DDP) or in one process")
    if s.fsdp and dist.world == 1:
        raise ValueError("fsdp shards the model across processes: run under torchrun (e.g. torchrun "
                         "--nproc_per_node=2 -m zoo train ... --fsdp), or drop --fsdp")
    return dist


def make_model(s, source, init, overrides=None, resumed=None, rank=0):
    """(the model a run with settings `s` trains, the init source's own tokenizer or None).

    The model: `resumed` (a checkpoint's, as it is), else the weights of `init` (a LoRA run's frozen base in
    bfloat16 with bf16 or lora_int8, as LoRA recipes load it; over int8 in float32 on a CPU without bf16), else a
    fresh `source` preset; `overrides`: config fields (mlm: bidirectional attention unless they set causal). Then
    LoRA adapters on it, or the adapter of a LoRA checkpoint merged in (adapters.prepare). Every random generator
    is seeded from s.seed first, so every rank builds the same weights, then torch's per rank, so dropout masks
    differ. s.block_size becomes the model's (at most 1024) unless set; a longer one than the model's is a
    ValueError."""
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    np.random.seed(s.seed)
    overrides, tokenizer = dict(overrides or {}), None
    if s.objective == "mlm" and resumed is None and (init or get_preset(source).arch in mlm.TRANSFORMERS):
        overrides.setdefault("causal", False)  # MLM: bidirectional attention unless the caller sets causal
    if resumed is not None:
        model = resumed
    elif init is not None:  # a LoRA run in bf16 (or over int8) keeps its frozen base in bf16, as LoRA recipes do
        # (over int8 on a CPU without bf16 arithmetic, in float32, as settings leaves bf16 there: the bf16 GEMMs of
        # attention and of the head's loss ran through torch's reference loop, most of such a run's time)
        low = s.lora_r and (s.bf16 or s.lora_int8)
        dtype = (torch.bfloat16 if computes_bf16(s.device) else torch.float32) if low else None
        path = source_path(init)
        model = from_pretrained(path, dtype=dtype, **overrides)
        try:
            tokenizer = own_tokenizer(init, path)
        except FileNotFoundError:  # none beside the weights: the run's named one (choose_tokenizer says if none)
            tokenizer = None
        if source is not None and (arch := arch_of(model)) != get_preset(source).arch:
            raise ValueError(f"preset {source!r} is a {get_preset(source).arch} model, but init {init!r} holds a "
                             f"{arch} model: with init (--init) the model comes from init and a preset only gives its "
                             f"training settings, so name a {arch} preset or none (zoo list)")
    else:
        preset = get_preset(source)
        model = build(preset.arch, {**preset.config, **overrides})
    if rank:
        torch.manual_seed(s.seed + rank)
    if resumed is None:
        model = adapters.prepare(model, s, init)
    mlm.check_model(model, s.objective)
    s.block_size = s.block_size or min(model.config.block_size, 1024)
    if s.block_size > model.config.block_size:
        raise ValueError(f"block_size {s.block_size} exceeds the model's block_size {model.config.block_size}; "
                         f"override the model's (--set block_size={s.block_size}) or train on shorter blocks")
    return model, tokenizer


def choose_tokenizer(name, *, named=False, checkpoint=None, init_tokenizer=None, preset=None, texts=(),
                     vocab_size=None):
    """The tokenizer a run uses: the first of
    1. a resumed run's own, saved in its `checkpoint` folder;
    2. the init source's own (`init_tokenizer`), unless the caller `named` one;
    3. the one `name` names (the caller's, the config's or the preset's): "char" is made from the training
       `texts` (file paths), "bpe" trained on them with `vocab_size` tokens, anything else loaded (gpt2, a
       tokenizer file or folder, a preset's);
    4. the `preset`'s published weights' own (a preset with a hub repo or a GGUF file).
    A run none of these gives a tokenizer is a ValueError."""
    if checkpoint:
        return tokenizers.load_tokenizer(checkpoint)
    if init_tokenizer is not None and not named:
        return init_tokenizer
    if name in ("char", "bpe"):
        docs = data.read_texts(texts)
        if name == "char":
            return tokenizers.CharTokenizer.from_text("".join(docs))
        try:
            return tokenizers.train_bpe(docs, vocab_size)
        except ValueError as e:  # (its one: too few tokens) the vocabulary is the model's, which the caller sets
            raise ValueError(f"tokenizer bpe: {e}, and it is trained to the model's vocab_size: give the model a "
                             "larger one (overrides vocab_size=N, --set vocab_size=N; a few thousand is usual)") \
                from None
    if name:
        if (tokenizer := tokenizers.find_tokenizer(name)) is None:  # (load_tokenizer's advice is the Python API's)
            raise ValueError(f"unknown tokenizer {name!r}{tokenizers.close_names(name, ('char', 'bpe'))}: tokenizer= "
                             "(--tokenizer) takes char (the training text's characters); bpe (a byte-level BPE "
                             f"trained on it); {tokenizers.SOURCES}")
        return tokenizer
    if preset is not None and (get_preset(preset).repo or get_preset(preset).gguf):
        return tokenizers.load_tokenizer(preset)
    raise ValueError(f"preset {preset!r} names no tokenizer: pass tokenizer= (--tokenizer) char, gpt2, bpe or a "
                     "tokenizer file")


def load_data(s, tokenizer, data_paths, val, vocab_size):
    """(training, validation) examples for settings `s`, their tokens checked against the model's `vocab_size`:
    dpo: preference pairs, one chosen and one rejected row each; conversations (JSONL messages): one padded row
    each, the assistant's tokens trained; text: windows of s.block_size tokens (mlm: with BERT's masks, drawn
    from the run's data stream). Without `val` the last tenth of the data validates."""
    if s.objective == "dpo":
        return preference.load_splits(data_paths, tokenizer, val, s.block_size, vocab_size)
    if preference.is_preference(data_paths):
        raise ValueError(f"{data_paths[0]} holds preference pairs (prompt, chosen, rejected): train on them with "
                         "objective dpo (--objective dpo)")
    if chat_data.is_chat(data_paths + (val or [])):
        if s.objective == "mlm":
            raise ValueError("conversations (JSONL messages) train the causal objective; mlm takes plain text")
        return chat_data.load_splits(data_paths, tokenizer, val, s.block_size, vocab_size)
    train_tokens, val_tokens = data.load_splits(data_paths, tokenizer, val, s.block_size, vocab_size)
    windows = data.Windows(train_tokens, s.block_size), data.Windows(val_tokens, s.block_size)
    if s.objective == "mlm":  # (zoo/mlm.py)
        return tuple(mlm.MaskedWindows(w, tokenizer, s.mask_prob, seed=s.seed) for w in windows)
    return windows


@dataclass
class Run:
    """What the loop trains and where it stands."""
    model: torch.nn.Module  # the model itself: clipped, evaluated and checkpointed
    net: torch.nn.Module  # what the training forward calls: the model, compiled and/or in DDP when asked
    optimizer: torch.optim.Optimizer
    loss_of: object  # (net, x, y, label_smoothing) -> loss: HeadLoss (zoo/loss.py) or DPO's (zoo/preference.py)
    router: RouterLoss  # a mixture of experts' load-balancing losses (zoo/routing.py)
    batch_rng: torch.Generator  # the data stream: one index stream shared by all ranks (see optimizer_step)
    step: int  # optimizer steps taken
    horizon: int  # the step the run ends at (a time budget replaces 10**9 after the first steps)
    dpo_state: dict | None = None  # a DPO run's reference, saved with its checkpoints (preference.prepare)


def prepare_run(model, s, train_data, val_data, dist, state=None, init=None, checkpoint=None):
    """The Run for `model` with settings `s`: on its device, in training mode, DPO's reference made (from the
    data when precomputed), activation checkpointing and FSDP's shards when asked, a fresh optimizer; a resumed
    run (`state`, read from `checkpoint`) where it stopped (restore)."""
    model.to(s.device).train()
    if s.objective == "dpo":  # the reference model (or its log-probabilities) and the DPO loss
        loss_of, dpo_state = preference.prepare(model, s, train_data, val_data, state and state.get("dpo"), init,
                                                lambda: forward_context(s))
    if s.grad_checkpoint:
        checkpoint_blocks(model)
    if s.fsdp:
        shard(model, s.bf16)
    optimizer = make_optimizer(model, s, s.device)
    batch_rng = torch.Generator().manual_seed(s.seed)
    step, horizon = 0, s.max_iters or 10 ** 9
    if state:
        step, horizon = restore(state, model, optimizer, batch_rng, s, dist.rank, checkpoint)
    if s.objective != "dpo":
        loss_of, dpo_state = HeadLoss(model), None  # the loss through the output layer in chunks (zoo/loss.py)
    router = RouterLoss(model)
    return Run(model, wrap(model, s, dist.world), optimizer, loss_of, router, batch_rng, step, horizon, dpo_state)


def restore(state, model, optimizer, batch_rng, s, rank, checkpoint):
    """(step, horizon) of a resumed run, whose optimizer, data stream and random generators become what its
    checkpoint saved (`state`). A new s.max_iters moves the horizon (with a warning where the cosine decay
    changes)."""
    load_optimizer_state(model, optimizer, state["optimizer"], s.fsdp)
    step, horizon = state["step"], state["horizon"]
    if s.max_iters is not None and s.max_iters != state["settings"].get("max_iters"):
        if s.schedule == "cosine" and s.max_iters > step:
            note.warning("zoo: the horizon changed from %d to %d steps: from step %d on, the cosine schedule "
                         "decays over the new horizon, so the run differs from one planned for %d steps",
                         horizon, s.max_iters, step, s.max_iters)
        horizon = s.max_iters
    if step >= horizon:
        note.warning("zoo: nothing to train: the checkpoint %s is at step %d and max_iters is %d; give a "
                     "larger max_iters to continue", checkpoint, step, horizon)
    batch_rng.set_state(state["data"])
    runs.set_rng_states(state["rng"])
    if rank:
        torch.manual_seed(s.seed + rank + step)
    return step, horizon


# ---------------------------------------------------------------------------------------- the loop

def fit(run, s, train_data, val_data, dist, out, tokenizer, inputs):
    """Train `run` up to run.horizon with settings `s`; return the last validation loss (on the ranks that
    validate: rank 0, and every rank under FSDP, which gathers the shards; else None). Every s.log_interval
    steps: the training loss (a non-finite one stops the run with FloatingPointError), and with a time budget
    the horizon planned anew (Budget); every s.eval_interval steps a validation loss; every
    s.checkpoint_interval steps a checkpoint in `out` with `tokenizer` and what the run started from (`inputs`,
    started_from's: runs.save_checkpoint); both at the end.
    Rank 0 writes OUT/log.jsonl and loss.png and shows the progress bar."""
    master, gathers = dist.rank == 0, dist.rank == 0 or s.fsdp
    eval_at = val_data.fixed(s.eval_iters * s.batch_size)
    d_model = getattr(run.model.config, "n_embd", run.model.config.vocab_size)
    log = Log(out, run.step) if master else None
    timer = Budget(s) if s.time_budget else None
    tokens_per_step = s.batch_size * s.block_size * s.grad_accum
    bar = progress_bar(total=run.horizon, initial=run.step, unit="step", enabled=s.progress) if master else None
    val_loss, last_val_step, meter = None, None, Meter(s.device)
    try:
        while run.step < run.horizon:
            lr = learning_rate(s, run.step + 1, run.horizon, d_model)
            optimizer_step(run, s, train_data, dist, lr, meter.losses)
            run.step += 1
            meter.steps += 1

            if run.step % s.log_interval == 0 or run.step == run.horizon:
                loss, steps, seconds = meter.read(dist)
                if not math.isfinite(loss):
                    good = runs.latest_checkpoint(out)
                    raise FloatingPointError(
                        f"the training loss became {loss} by step {run.step}; stopped. The last good checkpoint "
                        f"is {good or 'none'}; lower --lr, raise --warmup or set --grad-clip, then --resume")
                tok_s = tokens_per_step * steps / seconds
                extra = {k: round(v, 4) for k, v in run.loss_of.metrics.read(dist.mean).items() if k != "loss"} \
                    if s.objective == "dpo" else run.router.report()  # DPO's rewards, or a mixture's expert shares
                if master:
                    log.write(step=run.step, loss=round(loss, 4), lr=lr, tok_per_s=round(tok_s), **extra)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if timer:  # rank 0 plans; every rank must stop at the same step
                    if master:
                        horizon, stop = timer.plan(run.step, seconds / steps, s.eval_interval)
                        run.horizon = run.step if stop else horizon
                    run.horizon = int(dist.share([run.horizon])[0])
                    if master:
                        bar.total = run.horizon
            if master:
                bar.update()
            last = run.step >= run.horizon
            if gathers and (run.step % s.eval_interval == 0 or last):
                t = time.time()
                metrics, last_val_step = validate(run.model, val_data, s, eval_at, run.loss_of), run.step
                val_loss = metrics["val_loss"]
                if master:
                    log.write(step=run.step, **{k: round(v, 4) for k, v in metrics.items()})
                    note.info("step %d: val_loss %.4f", run.step, val_loss)
                meter.leave_out(t)  # evaluation time is not training throughput
                if timer:
                    timer.eval_seconds = time.time() - t
            if gathers and (run.step % s.checkpoint_interval == 0 or last):
                t = time.time()
                runs.save_checkpoint(out, run.step, run.model, tokenizer, run.optimizer, run.horizon, run.batch_rng,
                                     s, master, dpo=run.dpo_state, inputs=inputs)
                meter.leave_out(t)
                if timer:
                    timer.checkpoint_seconds = time.time() - t
        if gathers and last_val_step != run.step:  # resumed at the very end: nothing left to train
            val_loss = validate(run.model, val_data, s, eval_at, run.loss_of)["val_loss"]
    finally:
        if bar is not None:
            bar.close()
        if master:
            log.plot()
    return val_loss


def optimizer_step(run, s, train_data, dist, lr, losses):
    """One optimizer step of `run` at learning rate `lr` over a global batch of s.grad_accum x s.batch_size
    examples: this process's micro-batches forward and backward (gradients reduced across processes on the
    last), the gradient norm clipped to s.grad_clip, the weights updated. Each micro-batch's language-model
    loss, scaled to its share of the step, is added to `losses` (on the device: no host sync per step)."""
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    # All ranks draw the same indices for the whole global batch and each takes its own slice,
    # so N processes see exactly the batches one process accumulating N times as much would.
    index = train_data.draw(run.batch_rng, (s.grad_accum, s.batch_size))
    local_accum = s.grad_accum // dist.world
    for micro in range(local_accum):
        x, y = train_data.batch(index[dist.rank * local_accum + micro], s.device)
        sync = micro == local_accum - 1 or dist.world == 1
        with gradient_sync(run.net, run.model, sync, s.fsdp), forward_context(s):
            loss = run.loss_of(run.net, x, y, s.label_smoothing) / s.grad_accum * dist.world
            routed = loss + run.router.loss(dist.world / s.grad_accum)  # the LM loss is logged alone
        routed.backward()
        losses += loss.detach()
    if s.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def learning_rate(s, step, horizon, d_model):
    """The learning rate of optimizer step `step` (counting from 1)."""
    if s.schedule == "noam":  # Vaswani et al. (2017), eq. 3, scaled by s.lr
        return s.lr * d_model ** -0.5 * min(step ** -0.5, step * s.warmup ** -1.5)
    if step <= s.warmup:
        return s.lr * step / s.warmup
    if s.schedule == "constant":
        return s.lr
    progress = min(1.0, (step - s.warmup) / max(1, horizon - s.warmup))
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - s.min_lr)


def make_optimizer(model, s, device):
    # decay matrices and embeddings only: decaying gains and biases only hurts (GPT-2, nanoGPT)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=s.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    fused = torch.device(device).type in ("cpu", "cuda")  # one kernel per step instead of many small ones
    return AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=fused or None)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW, its state and steps, less the decorators that keep torch.compile out of its methods:
    those import torch._dynamo on their first call, 1.4 s of every run's start-up (a 1,000-step shakespeare-char
    run takes 35 s in all), and training never compiles the optimizer. inspect.unwrap gives each method as
    written; the step's decorator also turned off grad, as torch.no_grad does here."""
    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)
    step = torch.no_grad()(inspect.unwrap(torch.optim.AdamW.step))


def forward_context(s):
    """Where forward passes run: in bf16 autocast when asked. (Short causal blocks in bf16 on the CPU get the
    models' own written-out attention, 2-5x faster there than SDPA's kernels: see Attend in models/gpt2.py.)"""
    return torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16, enabled=bool(s.bf16))


@torch.no_grad()
def evaluate(model, val, s, index, loss_of):
    """Mean loss per counted target over the validation examples `index` names (the same ones every time,
    so evaluations compare); loss_of: the run's HeadLoss."""
    total, count = torch.zeros((), device=s.device), torch.zeros((), device=s.device)
    with eval_mode(model):
        for i in range(0, len(index), s.batch_size):
            x, y = val.batch(index[i:i + s.batch_size], s.device)
            with forward_context(s):
                total += loss_of(model, x, y, reduction="sum")
            count += (y != data.IGNORE).sum()
    return total.item() / count.item()


def validate(model, val, s, index, loss_of):
    """{"val_loss": ...} over the validation examples `index` names; for preference pairs the DPO metrics too."""
    if s.objective == "dpo":
        return preference.evaluate(model, val, s.batch_size, s.device, index, loss_of, lambda: forward_context(s))
    return {"val_loss": evaluate(model, val, s, index, loss_of)}


class Meter:
    """The training loss and throughput between two log steps: the losses summed on the device (read at log
    steps only) and the wall time, less what evaluations and checkpoints took."""

    def __init__(self, device):
        self.losses, self.steps, self.start = torch.zeros((), device=device), 0, time.time()

    def read(self, dist):
        """(mean loss per step over every process, steps, seconds) since the last read."""
        loss = dist.mean(self.losses / self.steps).item()  # (each micro-loss is already scaled to its share)
        self.losses.zero_()
        steps, seconds, self.start = self.steps, time.time() - self.start, time.time()
        self.steps = 0
        return loss, steps, seconds

    def leave_out(self, since):
        """Leave the time from `since` until now out of the training time."""
        self.start += time.time() - since


def process_start():
    """When this process started (Linux: from /proc), else now. A --time-budget counts from there, so
    interpreter start-up and imports are inside the budget too."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class Budget:
    """Plans a --time-budget run: how many steps fit, given the measured step, eval and checkpoint times."""
    EXIT_SECONDS = 1.5  # after the last checkpoint: the loss plot and the interpreter's teardown

    def __init__(self, s):
        self.deadline = process_start() + s.time_budget
        self.s = s
        self.step_seconds = None
        self.eval_seconds = None
        self.checkpoint_seconds = 1.0

    def plan(self, step, step_seconds, eval_interval):
        """(horizon, stop now) from the mean step time of the last log interval."""
        first = self.step_seconds is None
        if step <= 2 * self.s.log_interval:  # the first steps are slow (allocation, compilation): skip them
            self.step_seconds = step_seconds
        else:  # a moving average: the machine's speed drifts (shared cores); one slow interval should not
            self.step_seconds = 0.7 * self.step_seconds + 0.3 * step_seconds  # throw the schedule around
        eval_seconds = self.eval_seconds or 0.5 * self.s.eval_iters * self.step_seconds / self.s.grad_accum
        left = self.deadline - time.time() - eval_seconds - self.checkpoint_seconds - self.EXIT_SECONDS
        per_step = self.step_seconds + eval_seconds / eval_interval  # evaluations on the way cost time too
        steps = max(0, int(left / per_step))
        if first and left > 0:  # the first interval's warm-up overstates the step time: look again later
            steps = max(steps, self.s.log_interval)
        horizon = min(self.s.max_iters or step + steps, step + steps)
        return horizon, steps < self.s.log_interval


class Log:
    """log.jsonl in the output folder (one JSON object per log or eval step), and its loss curve."""

    def __init__(self, out, step):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "log.jsonl")
        self.out = out
        rows = []
        if step and os.path.exists(self.path):  # resumed: forget what was logged after the checkpoint
            with open(self.path) as f:  # (a kill mid-write leaves at most a partial last line: dropped)
                rows = [r for r in map(_json_or_none, f) if r is not None and r["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def write(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            note.warning("zoo: matplotlib is not installed, so no loss.png (pip install matplotlib)")
            return
        with open(self.path) as f:
            rows = [json.loads(line) for line in f]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("loss", "train"), ("val_loss", "validation")):
            pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out, "loss.png"), dpi=120)
        plt.close(fig)


def _json_or_none(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
