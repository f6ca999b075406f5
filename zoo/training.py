"""`zoo train`: one training loop for every model in the zoo, from scratch or from pretrained weights.

    zoo train shakespeare-char --data input.txt --tokenizer char --out out/
    torchrun --nproc_per_node=2 -m zoo train ...     # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Settings come from (lowest first) DEFAULTS, the preset's `train` dict, then the command line. Every
`checkpoint_interval` steps and at the end, OUT/step-NNNNNNN/ receives the weights (zoo.save_pretrained,
so zoo.from_pretrained and `zoo eval` read it) and training_state.pt (optimizer, schedule, RNG
states, data position), so `--resume` continues exactly where the run stopped.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import data
from .registry import PRESETS, arch_of, build, get_preset

DEFAULTS = dict(
    tokenizer=None, max_iters=None, batch_size=12, block_size=None, grad_accum=1,
    lr=6e-4, min_lr=None, schedule="cosine", warmup=100, weight_decay=0.1, beta1=0.9, beta2=0.95,
    grad_clip=1.0, label_smoothing=0.0, eval_interval=250, eval_iters=20, log_interval=10,
    checkpoint_interval=1000, seed=1337, bf16=False, compile=False, device=None, time_budget=None,
)
STATE_FILE = "training_state.pt"


def add_arguments(p):
    p.add_argument("preset", help="preset name: the model config and its default training settings")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files, or Hugging Face datasets as hf:NAME[:CONFIG][@SPLIT] (pip install "
                        "'zoo[datasets]'); the last 10%% validates unless --val is given")
    p.add_argument("--val", nargs="+", metavar="PATH", help="validation text files instead of the last 10%%")
    p.add_argument("--out", required=True, help="folder for checkpoints, log.jsonl and loss.png")
    p.add_argument("--tokenizer", help="char, gpt2, bpe (trained on --data) or a tokenizer file/folder")
    p.add_argument("--max-iters", type=int, help="optimizer steps (default 5000)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch and process")
    p.add_argument("--block-size", type=int, help="tokens per sequence (default: the model's block_size)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step, in total over all processes")
    p.add_argument("--lr", type=float, help="peak learning rate (noam: the scale factor)")
    p.add_argument("--min-lr", type=float, help="cosine floor (default lr/10)")
    p.add_argument("--schedule", choices=["cosine", "noam"], help="warmup+cosine, or inverse square root")
    p.add_argument("--warmup", type=int, help="warmup steps")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices and embeddings")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0: off)")
    p.add_argument("--eval-interval", type=int, help="steps between validation losses")
    p.add_argument("--eval-iters", type=int, help="validation batches per evaluation")
    p.add_argument("--log-interval", type=int, help="steps between log lines")
    p.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 autocast (CPU and CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--init", metavar="SOURCE", help="start from pretrained weights (preset, hub id, folder, .gguf)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="wall time of the whole command; the schedule's horizon follows the measured step time")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="model config override")


def run(args):
    try:
        val_loss = train(args)
    except FloatingPointError as e:  # diverged: say so plainly, the last good checkpoint stays
        print(f"zoo train: {e}", file=sys.stderr)
        return 1
    if val_loss is not None:  # rank 0 only
        print(f"val_loss {val_loss:.4f}", flush=True)
    if args.time_budget or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Everything is written and flushed. Skip the interpreter's teardown: with torch loaded it takes
        # seconds on a busy machine (outside any time budget), and a gloo job can abort during it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def settings_from(args):
    """DEFAULTS < the preset's train dict < the flags given on the command line."""
    preset = get_preset(args.preset)
    unknown = set(preset.train) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"preset {args.preset!r} has unknown training settings {sorted(unknown)}")
    s = {**DEFAULTS, **preset.train}
    s.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    s = SimpleNamespace(**s)
    # a preset's min_lr must not exceed a lower --lr given on the command line: the decay never rises
    s.min_lr = s.lr / 10 if s.min_lr is None else min(s.min_lr, s.lr)
    if s.max_iters is None and not s.time_budget:  # with a time budget the budget sets the horizon
        s.max_iters = 5000
    s.device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval",
                 "checkpoint_interval"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(s, name)}")
    if s.schedule == "noam" and s.warmup < 1:
        raise ValueError("the noam schedule needs --warmup of at least 1 step")
    if s.max_iters is not None and s.max_iters < 1:
        raise ValueError(f"--max-iters must be at least 1, not {s.max_iters}")
    return s


def parse_overrides(pairs):
    """--set n_layer=2 --set bias=false -> {"n_layer": 2, "bias": False} (JSON values, else strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------- setup

def load_pretrained(source, **kw):
    """A model from a preset name (its published weights) or anything zoo.from_pretrained reads."""
    import zoo
    from .pretrained import from_pretrained
    return zoo.load(source, pretrained=True, **kw) if source in PRESETS else from_pretrained(source, **kw)


def with_config(model, overrides):
    """The same weights in a model whose config has `overrides` applied (e.g. dropout for fine-tuning)."""
    if not overrides:
        return model
    fields = {f.name for f in dataclasses.fields(model.config)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)}; valid fields: {', '.join(sorted(fields))}")
    new = build(arch_of(model), dataclasses.replace(model.config, **overrides))
    new.load_state_dict(model.state_dict())
    return new


def make_tokenizer(name, docs, vocab_size):
    import zoo
    from . import tokenizers
    if name == "char":
        return tokenizers.CharTokenizer.from_text("".join(docs))
    if name == "bpe":
        return tokenizers.train_bpe(docs, vocab_size)
    return zoo.tokenizer(name)


def latest_checkpoint(out):
    steps = sorted(d for d in os.listdir(out) if d.startswith("step-")) if os.path.isdir(out) else []
    return os.path.join(out, steps[-1]) if steps else None


def learning_rate(s, step, horizon, d_model):
    """The learning rate of optimizer step `step` (counting from 1)."""
    if s.schedule == "noam":  # Vaswani et al. (2017), eq. 3, scaled by s.lr
        return s.lr * d_model ** -0.5 * min(step ** -0.5, step * s.warmup ** -1.5)
    if step <= s.warmup:
        return s.lr * step / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, horizon - s.warmup))
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - s.min_lr)


def make_optimizer(model, s, device):
    # decay matrices and embeddings only: decaying gains and biases only hurts (GPT-2, nanoGPT)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=s.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    fused = torch.device(device).type in ("cpu", "cuda")  # one kernel per step instead of many small ones
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=fused or None)


def rng_states():
    """Every RNG the run touches, as lists and tensors so torch.load(weights_only=True) reads them."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(state), gauss], numpy=[name, torch.from_numpy(keys.astype(np.int64)),
                                                             pos, has_gauss, cached],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(r):
    random.setstate((r["python"][0], tuple(r["python"][1]), r["python"][2]))
    name, keys, pos, has_gauss, cached = r["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(r["torch"])
    if r["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(r["cuda"])


def save_checkpoint(out, step, model, tokenizer, optimizer, horizon, batch_rng, s):
    """OUT/step-NNNNNNN: weights + tokenizer (zoo.save_pretrained) and the training state, all-or-nothing."""
    from .pretrained import save_pretrained
    final = os.path.join(out, f"step-{step:07d}")
    tmp = os.path.join(out, f".tmp-step-{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    torch.save(dict(step=step, horizon=horizon, optimizer=optimizer.state_dict(), rng=rng_states(),
                    data=batch_rng.get_state(), arch=arch_of(model), config=dataclasses.asdict(model.config),
                    settings=vars(s)), os.path.join(tmp, STATE_FILE))
    shutil.rmtree(final, ignore_errors=True)  # only when re-running over an older run's checkpoint
    os.replace(tmp, final)  # a crash before this line leaves only the .tmp folder, never a broken step-*
    return final


# ---------------------------------------------------------------------------------------- the loop

class Distributed:
    """torchrun's environment, or a single process (rank 0 of 1)."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist
            if device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")

    def mean(self, t):
        if self.world > 1:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t

    def share(self, values):
        """rank 0's numbers, on every rank (decisions taken on rank 0 must be taken everywhere)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.broadcast(t, 0)
        return t.tolist()

    def close(self):
        # on this machine a gloo job can abort at exit unless every rank gets here before teardown
        if self.world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


@contextmanager
def forward_context(s):
    """Where forward passes run: in bf16 autocast when asked. On the CPU in bf16, short sequences also get
    SDPA's plain (math) kernel: forward + backward measured 2.0x (64 tokens) and 1.7x (128 tokens) faster
    there than with the flash kernel, which wins from 256 tokens on, and in fp32."""
    device = torch.device(s.device).type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bool(s.bf16)):
        if s.bf16 and device == "cpu" and s.block_size <= 128:
            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield


@torch.no_grad()
def evaluate(model, val, s, starts):
    """Mean next-token loss over fixed validation windows (the same every time, so evaluations compare)."""
    model.eval()
    total, count = torch.zeros((), device=s.device), 0
    for i in range(0, len(starts), s.batch_size):
        x, y = data.windows(val, starts[i:i + s.batch_size], s.block_size, s.device)
        with forward_context(s):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        count += y.numel()
    model.train()
    return total.item() / count


def train(args):
    """Train as `args` (the `zoo train` namespace) says; returns the final validation loss."""
    s = settings_from(args)
    dist = Distributed(s.device)
    s.device, master = dist.device, dist.rank == 0
    if s.grad_accum % dist.world:
        raise ValueError(f"--grad-accum {s.grad_accum} must be a multiple of the {dist.world} processes")
    local_accum = s.grad_accum // dist.world
    torch.manual_seed(s.seed + dist.rank)  # dropout masks differ per rank
    random.seed(s.seed)
    np.random.seed(s.seed)

    # the model: a checkpoint to resume, pretrained weights, or a fresh preset
    overrides = parse_overrides(args.set)
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint (step-*) in {args.out!r}")
    state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True) if ckpt else None
    if state:
        model = build(state["arch"], state["config"])
        model.load_state_dict(load_pretrained(ckpt).state_dict())
    elif args.init:
        model = with_config(load_pretrained(args.init), overrides)
    else:
        preset = get_preset(args.preset)
        model = build(preset.arch, {**preset.config, **overrides})
    cfg = model.config
    s.block_size = s.block_size or min(cfg.block_size, 1024)
    if s.block_size > cfg.block_size:
        raise ValueError(f"--block-size {s.block_size} exceeds the model's block_size {cfg.block_size}; "
                         f"use --set block_size={s.block_size} or a smaller --block-size")

    # the tokenizer and the token files, checked against the model before any training
    docs = None
    if ckpt or (args.init and not args.tokenizer):  # a pretrained source brings its own
        import zoo
        tokenizer = zoo.tokenizer(ckpt or args.init)
    elif not s.tokenizer:
        raise ValueError(f"preset {args.preset!r} names no tokenizer: pass --tokenizer char|gpt2|bpe|FILE")
    else:
        docs = data.read_texts(args.data + (args.val or []))
        tokenizer = make_tokenizer(s.tokenizer, docs, cfg.vocab_size)
    train_data, val_data = data.load_splits(args.data, tokenizer, args.val, s.block_size, cfg.vocab_size)
    del docs

    model.to(s.device)
    optimizer = make_optimizer(model, s, s.device)
    batch_rng = torch.Generator().manual_seed(s.seed)  # one index stream shared by all ranks (see below)
    horizon, step = s.max_iters or 10 ** 9, 0  # a time budget replaces 10**9 after the first steps
    if state:
        optimizer.load_state_dict(state["optimizer"])
        step, horizon = state["step"], state["horizon"]
        batch_rng.set_state(state["data"])
        set_rng_states(state["rng"])
        if dist.rank:
            torch.manual_seed(s.seed + dist.rank + step)
    net = torch.compile(model) if s.compile else model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(net, device_ids=[s.device] if s.device.startswith("cuda") else None)
    eval_at = data.eval_starts(val_data, s.block_size, s.eval_iters * s.batch_size)
    d_model = getattr(cfg, "n_embd", cfg.vocab_size)

    log = Log(args.out, step) if master else None
    timer = Budget(s) if s.time_budget else None
    tokens_per_step = s.batch_size * s.block_size * s.grad_accum
    bar = None
    if master:
        from tqdm import tqdm
        bar = tqdm(total=horizon, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    val_loss, last_val_step, loss_sum, t_log, steps_logged = None, None, torch.zeros((), device=s.device), \
        time.time(), 0
    try:
        while step < horizon:
            lr = learning_rate(s, step + 1, horizon, d_model)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # All ranks draw the same indices for the whole global batch and each takes its own slice,
            # so N processes see exactly the batches one process accumulating N times as much would.
            starts = torch.randint(len(train_data) - s.block_size, (s.grad_accum, s.batch_size),
                                   generator=batch_rng)
            for micro in range(local_accum):
                x, y = data.windows(train_data, starts[dist.rank * local_accum + micro], s.block_size, s.device)
                sync = micro == local_accum - 1 or dist.world == 1
                with (nullcontext() if sync else net.no_sync()), forward_context(s):
                    logits = net(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                           label_smoothing=s.label_smoothing) / s.grad_accum * dist.world
                loss.backward()
                loss_sum += loss.detach()  # no host sync here: the value is read at log steps only
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_logged += 1

            if step % s.log_interval == 0 or step == horizon:
                loss = dist.mean(loss_sum / steps_logged).item()  # (each micro-loss is already scaled to its share)
                loss_sum.zero_()
                if not math.isfinite(loss):
                    good = latest_checkpoint(args.out)
                    raise FloatingPointError(
                        f"the training loss became {loss} by step {step}; stopped. The last good checkpoint is "
                        f"{good or 'none'}; lower --lr, raise --warmup or set --grad-clip, then --resume")
                dt, t_log = time.time() - t_log, time.time()
                tok_s = tokens_per_step * steps_logged / dt
                if master:
                    log.write(step=step, loss=round(loss, 4), lr=lr, tok_per_s=round(tok_s))
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if timer:  # rank 0 plans; every rank must stop at the same step
                    if master:
                        horizon, stop = timer.plan(step, dt / steps_logged, s.eval_interval)
                        horizon = step if stop else horizon
                    horizon = int(dist.share([horizon])[0])
                    if master:
                        bar.total = horizon
                steps_logged = 0
            if master:
                bar.update()
            last = step >= horizon
            if master and (step % s.eval_interval == 0 or last):
                t = time.time()
                val_loss, last_val_step = evaluate(model, val_data, s, eval_at), step
                log.write(step=step, val_loss=round(val_loss, 4))
                bar.write(f"step {step}: val_loss {val_loss:.4f}", file=sys.stdout)
                t_log += time.time() - t  # evaluation time is not training throughput
                if timer:
                    timer.eval_seconds = time.time() - t
            if master and (step % s.checkpoint_interval == 0 or last):
                t = time.time()
                save_checkpoint(args.out, step, model, tokenizer, optimizer, horizon, batch_rng, s)
                t_log += time.time() - t
                if timer:
                    timer.checkpoint_seconds = time.time() - t
    finally:
        if bar is not None:
            bar.close()
        if master:
            log.plot()
        dist.close()
    if master and last_val_step != step:  # resumed at the very end: nothing left to train
        val_loss = evaluate(model, val_data, s, eval_at)
    return val_loss


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
            with open(self.path) as f:
                rows = [r for r in map(json.loads, f) if r["step"] <= step]
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
            print("note: matplotlib is not installed, so no loss.png (pip install matplotlib)", file=sys.stderr)
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
