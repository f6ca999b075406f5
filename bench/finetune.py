"""Fine-tuning SmolLM2-135M-Instruct: zoo LoRA vs transformers + peft LoRA, side by side, plus zoo's full
fine-tune and LoRA over an int8 base, each also with activation checkpointing (--grad-checkpoint: each
block recomputed in the backward pass, as QLoRA recipes run; peft's prepare_model_for_kbit_training turns
it on by default).

    flock /tmp/bench.lock python bench/finetune.py [--rounds 3] [--steps 4] [--profile]
    flock /tmp/bench.lock python bench/finetune.py --rows "zoo DPO LoRA" "zoo DPO LoRA, grad checkpoint" \
        "TRL DPO + peft LoRA"   # preference tuning

Every row trains the same weights (the packaged GGUF, written once as a Hugging Face folder) on the same
tokens: batch 8 x 256, bf16 autocast, AdamW, LoRA r 16 / alpha 32 on every attention and MLP projection,
loss on every position. zoo rows are `zoo.train` itself (its log's tokens/s of each step after the
first); the peer is a plain loop over transformers' model (loaded in bf16, as LoRA recipes do; peft keeps
its adapters in fp32) with peft's LoRA. Each row runs in a fresh process; rows alternate
within each round so that the machine's load drifts over all of them alike. Memory: peak RSS (VmHWM)
minus RSS after the imports, i.e. the model, optimizer and activations.

The DPO rows train on the same preference pairs (plain text, 128 tokens a sequence, batch 8 pairs: 16
sequences), the reference the base with the adapters off: `zoo.train(..., objective="dpo")` against TRL's
DPOTrainer with peft's LoRA (bf16, the same LoRA); tokens/s counts the chosen and rejected sequences' tokens.
TRL's DPOConfig checkpoints activations by default (gradient_checkpointing=True), as the bench leaves it: the
like-for-like zoo row for memory is "zoo DPO LoRA, grad checkpoint".

Goals: zoo LoRA (and zoo DPO LoRA) >= 1.5x transformers + peft tokens/s at <= its peak memory; LoRA over int8 <= 0.6x the
peak memory of zoo's full fine-tune (printed for the same settings and against the plain full fine-tune).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

B, T, R, ALPHA = 8, 256, 16, 32
ROWS = ("zoo LoRA", "transformers + peft LoRA", "zoo full fine-tune", "zoo LoRA over int8",
        "zoo full fine-tune, grad checkpoint", "zoo LoRA over int8, grad checkpoint", "zoo DPO LoRA",
        "zoo DPO LoRA, grad checkpoint", "TRL DPO + peft LoRA")
PAIR_T = 128  # tokens of each DPO sequence (prompt + answer)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def text_file(folder):
    """Some English-like text (the tokens do not matter for speed; the same file feeds every row)."""
    import random
    rng = random.Random(0)
    words = "the of and to in is was that for on with as by at from his her they which be this had not".split()
    path = Path(folder) / "text.txt"
    path.write_text(" ".join(rng.choice(words) + ("." if rng.random() < 0.08 else "") for _ in range(120_000)))
    return path


def pairs_file(folder, tokenizer):
    """Preference pairs of PAIR_T tokens a sequence: a 96-token prompt, answers of 32 (end of text included)."""
    import random
    rng = random.Random(0)
    words = [w for w in "the of and to in is was that for on with as by at from his her they which be".split()
             if len(tokenizer.encode(" " + w)) == 1]
    text = lambda n: "".join(" " + rng.choice(words) for _ in range(n))  # noqa: E731 (one token a word)
    path = Path(folder) / "pairs.jsonl"
    with open(path, "w") as f:
        for _ in range(256):
            f.write(json.dumps({"prompt": "Go" + text(PAIR_T - 32 - 1 - tokenizer.add_bos), "chosen": text(31),
                                "rejected": text(31)}) + "\n")
    return path


def child_zoo_dpo(base, folder, steps, grad_checkpoint):
    import torch
    import zoo
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    before = rss_mb("VmRSS")
    out = Path(tempfile.mkdtemp(dir=folder, prefix="zoo-dpo-"))
    data = pairs_file(folder, zoo.tokenizer(base))
    zoo.train(None, [str(data)], out, init=base, objective="dpo", beta=0.1, lora_r=R, lora_alpha=ALPHA,
              batch_size=B, block_size=PAIR_T, bf16=True, max_iters=steps + 1, log_interval=1,
              eval_interval=10 ** 6, eval_iters=1, checkpoint_interval=10 ** 6, warmup=1, progress=False, device="cpu",
              grad_checkpoint=grad_checkpoint)
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    shutil.rmtree(out)
    # the log's tok_per_s counts batch_size x block_size a step: 2 x that are the pairs' sequences' tokens
    tok_s = [2 * r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]
    return dict(tok_s=statistics.median(tok_s), peak_mb=rss_mb("VmHWM") - before)


def child_trl_dpo(base, folder, steps):
    import datasets
    import peft
    import torch
    import transformers
    import trl
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    before = rss_mb("VmRSS")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    import zoo
    rows = [json.loads(line) for line in open(pairs_file(folder, zoo.tokenizer(base)))]
    times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(dir=folder), beta=0.1, per_device_train_batch_size=B,
                         max_steps=steps + 1, bf16=True, use_cpu=True, learning_rate=1e-4, report_to=[],
                         save_strategy="no", logging_steps=10 ** 6, max_length=PAIR_T, disable_tqdm=True,
                         dataloader_num_workers=0)
    lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora, callbacks=[Timer()])
    trainer.train()
    return dict(tok_s=2 * B * PAIR_T / statistics.median(times[1:]), peak_mb=rss_mb("VmHWM") - before)


def child_zoo(row, base, folder, steps, profile):
    import torch
    import zoo
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    before = rss_mb("VmRSS")
    lora = {} if "full" in row else dict(lora_r=R, lora_alpha=ALPHA, lora_int8="int8" in row)
    out = Path(tempfile.mkdtemp(dir=folder, prefix=row.replace(" ", "-").replace(",", "") + "-"))
    kwargs = dict(init=base, batch_size=B, block_size=T, bf16=True, max_iters=steps + 1, log_interval=1,
                  eval_interval=10 ** 6, eval_iters=1, checkpoint_interval=10 ** 6, warmup=1, progress=False,
                  device="cpu", grad_checkpoint=row.endswith("grad checkpoint"), **lora)
    if profile:
        return profile_zoo(kwargs, [str(text_file(folder))], out)
    zoo.train(None, [str(text_file(folder))], out, **kwargs)
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    shutil.rmtree(out)  # its final checkpoint: up to 0.5 GB a row
    tok_s = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]  # after the first step's warm-up
    return dict(tok_s=statistics.median(tok_s), peak_mb=rss_mb("VmHWM") - before)


def child_peft(base, steps):
    import torch
    import torch.nn.functional as F
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    before = rss_mb("VmRSS")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS)
    model = peft.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    ids = torch.tensor(tok(Path(text_file(tempfile.mkdtemp())).read_text())["input_ids"])
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        starts = torch.randint(len(ids) - T - 1, (B,), generator=g)
        xy = torch.stack([ids[s:s + T + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=xy[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return dict(tok_s=B * T / statistics.median(times[1:]), peak_mb=rss_mb("VmHWM") - before)


def profile_zoo(kwargs, data, out):
    """Where a zoo LoRA step's time goes: torch.profiler over two steps, the top operators."""
    import torch
    import zoo
    kwargs = {**kwargs, "max_iters": 2, "log_interval": 1}
    zoo.train(None, data, str(out) + "-warm", **kwargs)
    with torch.profiler.profile() as prof:
        zoo.train(None, data, str(out) + "-prof", **kwargs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), file=sys.stderr)
    return {}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per row (after one warm-up step)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--profile", action="store_true", help="profile zoo's LoRA step instead (top operators)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        row, base, folder = args.child
        if row.startswith("zoo DPO LoRA"):
            result = child_zoo_dpo(base, folder, args.steps, row.endswith("grad checkpoint"))
        elif row == "TRL DPO + peft LoRA":
            result = child_trl_dpo(base, folder, args.steps)
        elif row.startswith("transformers"):
            result = child_peft(base, args.steps)
        else:
            result = child_zoo(row, base, folder, args.steps, args.profile)
        print(json.dumps(result))
        return

    import torch
    import zoo
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-finetune-"))
    model, tok = zoo.load_source("smollm2-135m-instruct")
    zoo.save_pretrained(model, work / "base", tokenizer=tok)  # the GGUF's weights, as both libraries read them
    del model
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "ZOO_CACHE": str(work / "cache")}
    if args.profile:
        subprocess.run([sys.executable, __file__, "--child", "zoo LoRA", work / "base", work, "--profile"], env=env)
        return
    results = {row: [] for row in args.rows}
    for round in range(args.rounds):
        for row in args.rows:
            r = subprocess.run([sys.executable, __file__, "--child", row, str(work / "base"), str(work), "--steps",
                                str(args.steps)], capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{row} failed:\n{r.stderr[-3000:]}")
            results[row].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"round {round + 1} {row}: {results[row][-1]}", file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct, batch {B} x {T} tokens, bf16, LoRA r {R} alpha {ALPHA} on every projection; "
          f"{args.rounds} rounds, torch {torch.__version__}, {env['OMP_NUM_THREADS']} threads\n")
    print("| row | tokens/s | peak RSS MB |\n|---|---|---|")
    for row, rs in results.items():
        tok = sorted(r["tok_s"] for r in rs)
        mem = sorted(r["peak_mb"] for r in rs)
        print(f"| {row} | {tok[0]:.0f}-{tok[-1]:.0f} | {mem[0]:.0f}-{mem[-1]:.0f} |")
    for ours, peer in (("zoo LoRA", "transformers + peft LoRA"), ("zoo DPO LoRA", "TRL DPO + peft LoRA"),
                       ("zoo DPO LoRA, grad checkpoint", "TRL DPO + peft LoRA")):
        if ours in results and peer in results:
            ratios = sorted(z["tok_s"] / p["tok_s"] for z, p in zip(results[ours], results[peer]))
            mems = sorted(z["peak_mb"] / p["peak_mb"] for z, p in zip(results[ours], results[peer]))
            print(f"\n{ours} / {peer}, same round: tokens/s {ratios[0]:.2f}-{ratios[-1]:.2f}x, "
                  f"peak memory {mems[0]:.2f}-{mems[-1]:.2f}x (goals: >= 1.5x, <= 1x)")
    for q, f in [("zoo LoRA over int8", "zoo full fine-tune"), ("zoo LoRA over int8, grad checkpoint",
                 "zoo full fine-tune, grad checkpoint"), ("zoo LoRA over int8, grad checkpoint", "zoo full fine-tune")]:
        if q in results and f in results:
            mems = sorted(a["peak_mb"] / b["peak_mb"] for a, b in zip(results[q], results[f]))
            print(f"{q} / {f} peak memory: {mems[0]:.2f}-{mems[-1]:.2f}x (goal: <= 0.6x)")


if __name__ == "__main__":
    main()
