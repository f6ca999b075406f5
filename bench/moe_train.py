"""A mixture of experts against dense models in the same wall time: validation loss on tiny Shakespeare.

    flock /tmp/bench.lock python bench/moe_train.py [--budget 90] [--png bench/moe_train.png]
    python bench/moe_train.py --budget 10 --png /tmp/moe_train.png     # a quick check that it runs

Three `zoo train` runs, one after the other, each with the same --time-budget (start-up, evaluations and
checkpoints included), on the characters of tiny Shakespeare (the last 10% validates):
  1. `moe-shakespeare`: 4 layers, 128 dims, 8 SwiGLU experts of width 128, each token through 2 of them.
  2. the same file and settings with 1 expert of width 256 (a router over one expert gives it weight 1): a
     dense SwiGLU with the same active parameters per token as 1., and a quarter of its feed-forward weights.
  3. `shakespeare-char` (nanoGPT's GPT-2-style dense model: GELU feed-forward of width 512).
Prints each run's total and active parameters, steps, tokens/s, final validation loss and the min/max share of
top-k picks any expert had in the last logged interval (8 experts, top 2: an even share is 0.125); writes the
validation loss against wall time (the log's rows, stamped as they appear) to --png.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zoo

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or ROOT.parent / "shared" / "data")
TEXT = SHARED_DATA / "tinyshakespeare.txt"

RUNS = [  # (label, preset, --set overrides)
    ("moe-shakespeare (8 experts x 128, top 2)", "moe-shakespeare", []),
    ("dense SwiGLU 256 (moe.py, 1 expert)", "moe-shakespeare", ["n_expert=1", "top_k=1", "expert_dim=256"]),
    ("shakespeare-char (GPT-2, GELU 512)", "shakespeare-char", []),
]


def parameters(preset, overrides):
    """(total, active per token) parameters of the model `zoo train` builds, embeddings included."""
    config = dict(zoo.registry.get_preset(preset).config)
    for o in overrides:
        k, v = o.split("=")
        config[k] = int(v)
    model = zoo.build(zoo.registry.get_preset(preset).arch, config)
    total = sum(p.numel() for p in model.parameters())
    n_expert, top_k = config.get("n_expert"), config.get("top_k")
    if not n_expert:
        return total, total
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, total - experts + experts * top_k // n_expert


def train(label, preset, overrides, budget, work):
    """Runs `zoo train` and returns its log rows, each stamped with the seconds since the command started."""
    out = Path(work) / label.split()[0]
    cmd = [sys.executable, "-m", "zoo", "train", preset, "--data", str(TEXT), "--out", str(out), "--tokenizer",
           "char", "--time-budget", str(budget), "--eval-interval", "100", "--log-interval", "25", "--no-progress",
           *[a for o in overrides for a in ("--set", o)]]
    print("$", " ".join(cmd), flush=True)
    t0, rows, seen = time.time(), [], 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    while True:
        done = proc.poll() is not None
        if log.exists():
            lines = log.read_text().splitlines()
            for line in lines[seen:]:
                try:
                    rows.append({**json.loads(line), "t": time.time() - t0})
                except json.JSONDecodeError:  # a line being written: read again next time
                    break
                seen += 1
        if done:
            break
        time.sleep(0.25)
    if proc.returncode:
        sys.exit(f"{label}: zoo train failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    return rows, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=90, help="--time-budget of each run, seconds")
    p.add_argument("--png", default=str(ROOT / "bench" / "moe_train.png"))
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for label, preset, overrides in RUNS:
            rows, wall = train(label, preset, overrides, args.budget, work)
            total, active = parameters(preset, overrides)
            vals = [(r["t"], r["val_loss"]) for r in rows if "val_loss" in r]
            trains = [r for r in rows if "tok_per_s" in r]
            shares = [r for r in trains if "expert_share_min" in r]
            results[label] = dict(total=total, active=active, steps=rows[-1]["step"], wall=wall,
                                  tok_s=sorted(r["tok_per_s"] for r in trains)[len(trains) // 2],
                                  val=vals[-1][1], curve=vals, by_step=[(r["step"], r["val_loss"]) for r in rows
                                                                      if "val_loss" in r],
                                  shares=(shares[-1]["expert_share_min"], shares[-1]["expert_share_max"])
                                  if shares and "1 expert" not in label else None)
    print(f"\n| run | parameters (active) | steps in {args.budget:g} s | tokens/s (median) | final val loss "
          f"| expert share min-max |\n|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        share = f"{r['shares'][0]:.3f}-{r['shares'][1]:.3f}" if r["shares"] else "-"
        print(f"| {label} | {r['total'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M) | {r['steps']} | {r['tok_s']:,} "
              f"| {r['val']:.4f} | {share} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, r in results.items():
        axes[0].plot(*zip(*r["curve"]), marker="o", markersize=3, label=label)
        axes[1].plot(*zip(*r["by_step"]), marker="o", markersize=3, label=label)
    axes[0].set(xlabel="wall time, s (zoo train's whole process)", ylabel="validation loss",
                title=f"tiny Shakespeare, {args.budget:g} s each")
    axes[1].set(xlabel="optimizer step (12 x 64 tokens)", title="the same runs by step")
    axes[0].set_ylim(top=min(2.6, max(v for r in results.values() for _, v in r["curve"])))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
