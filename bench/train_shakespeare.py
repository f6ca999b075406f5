"""Training speed and quality on the characters of tiny Shakespeare: zoo vs nanoGPT, side by side.

    python bench/train_shakespeare.py [--iters 2000] [--rounds 1] [--budget 95] [--nanogpt /work/peer/nanoGPT]
    python bench/train_shakespeare.py --iters 1000 --rounds 3 --budget 0      # whole-process ratio, interleaved

Runs one after the other on the same machine (use `flock /tmp/bench.lock` on a shared one):
  1. nanoGPT's train.py (from a nanoGPT checkout, run in a temporary copy; its code never enters this
     repository) on nanoGPT's CPU baby config: 4 layers, 4 heads, 128 dims, block 64, batch 12, --iters iters.
  2. `zoo train shakespeare-char ... --max-iters N --batch-size 12 --block-size 64`: the same model
     and batch shape, so tokens/s compare directly. 1 and 2 alternate for --rounds rounds.
  3. `zoo train shakespeare-char ... --time-budget 95`: the preset's own training settings, 95 s of wall
     time in all (nanoGPT's 2000 iterations take about that long).
Prints a table (tokens/s per step and its ratio to nanoGPT's, final validation loss, the whole process's wall time
from start-up to the last checkpoint and its ratio, ranges over the rounds) and writes the loss curves to --png.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or ROOT.parent / "shared" / "data")
TEXT = SHARED_DATA / "tinyshakespeare.txt"
TOKENS_PER_ITER = 12 * 64


def run(cmd, cwd=None):
    print("$", " ".join(map(str, cmd)), flush=True)
    t = time.time()
    r = subprocess.run(list(map(str, cmd)), cwd=cwd, capture_output=True, text=True)
    wall = time.time() - t
    if r.returncode:
        sys.exit(f"failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout, wall


def nanogpt(checkout, work, iters):
    """nanoGPT's own train.py on the baby config; returns (tok/s, final val loss, wall, [(iter, val)])."""
    copy = Path(work) / "nanoGPT"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out*"))
    data = copy / "data" / "shakespeare_char"
    shutil.copy(TEXT, data / "input.txt")  # prepare.py downloads it otherwise
    run([sys.executable, "prepare.py"], cwd=data)
    out, wall = run([sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
                     "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
                     "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                     "--dropout=0.0", f"--out_dir={Path(work) / 'nanogpt-out'}"], cwd=copy)
    # per-iteration times, leaving out the first iterations (warm-up) and those that include an evaluation
    evals = {int(m[1]) for m in re.finditer(r"^step (\d+):", out, re.M)}
    times = [float(m[2]) for m in re.finditer(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", out, re.M)
             if int(m[1]) > 5 and int(m[1]) not in evals]
    vals = [(int(m[1]), float(m[2])) for m in re.finditer(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)",
                                                          out, re.M)]
    return TOKENS_PER_ITER / (statistics.median(times) / 1000), vals[-1][1], wall, vals


def zoo(out, *flags):
    """`zoo train shakespeare-char` with `flags`; returns (tok/s, final val loss, wall, [(step, val)], log)."""
    shutil.rmtree(out, ignore_errors=True)
    stdout, wall = run([sys.executable, "-m", "zoo", "train", "shakespeare-char", "--data", TEXT, "--tokenizer",
                        "char", "--out", out, *flags])
    rows = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    speeds = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]  # the first interval includes warm-up
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return statistics.median(speeds), float(stdout.split()[-1]), wall, vals, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", default="/work/peer/nanoGPT", help="a nanoGPT checkout (skipped if absent)")
    p.add_argument("--png", default=str(ROOT / "bench" / "train_shakespeare.png"), help="where the curves go")
    p.add_argument("--iters", type=int, default=2000, help="iterations of the side-by-side runs")
    p.add_argument("--rounds", type=int, default=1, help="nanoGPT and zoo runs, interleaved (ranges over them)")
    p.add_argument("--budget", type=float, default=95, help="the time-budget run's seconds (0: no such run)")
    args = p.parse_args()
    if not TEXT.is_file():
        sys.exit(f"{TEXT} is missing")
    if not os.path.isdir(args.nanogpt):
        print(f"note: no nanoGPT checkout at {args.nanogpt}; zoo alone", file=sys.stderr)
    n, runs = args.iters, {}  # name -> one result per round
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            if os.path.isdir(args.nanogpt):
                runs.setdefault(f"nanoGPT, {n} iters", []).append(nanogpt(args.nanogpt, work, n))
            runs.setdefault(f"zoo, {n} iters", []).append(zoo(
                os.path.join(work, f"zoo-{n}"), "--max-iters", str(n), "--batch-size", "12", "--block-size", "64",
                "--log-interval", "1"))  # per-step times, as nanoGPT's log gives them
        if args.budget:
            runs[f"zoo, --time-budget {args.budget:g}"] = [zoo(os.path.join(work, "zoo-budget"), "--time-budget",
                                                                str(args.budget))]

    peer = runs.get(f"nanoGPT, {n} iters")
    span = lambda xs, f: f(min(xs)) if min(xs) == max(xs) else f"{f(min(xs))}-{f(max(xs))}"  # noqa: E731
    print(f"\n| run | tokens/s (median step) | vs nanoGPT, per step | final val loss | wall (whole process) "
          f"| vs nanoGPT, whole process |\n|---|---:|---:|---:|---:|---:|")
    for name, results in runs.items():
        tok_s, vals, walls = [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]
        step_ratio = whole_ratio = "-"
        if peer and "iters" in name:  # round by round: each zoo run against the nanoGPT run beside it
            step_ratio = span([z[0] / q[0] for z, q in zip(results, peer)], lambda x: f"{x:.2f}x")
            whole_ratio = span([q[2] / z[2] for z, q in zip(results, peer)], lambda x: f"{x:.2f}x")
        print(f"| {name} | {span(tok_s, lambda x: f'{x:,.0f}')} | {step_ratio} | {span(vals, lambda x: f'{x:.3f}')} "
              f"| {span(walls, lambda x: f'{x:.1f} s')} | {whole_ratio} |")
    plot({name: results[-1] for name, results in runs.items()}, args.png)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (_, _, _, vals, *rest) in results.items():
        ax.plot(*zip(*vals), marker="o", markersize=3, label=f"{name}: validation")
        if rest and "budget" in name:  # zoo's training loss from its log (10-step means)
            rows = rest[0]
            ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r],
                    alpha=0.35, linewidth=0.8, label=f"{name}: training")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_ylim(1.3, 3.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("tiny Shakespeare, shakespeare-char (4 layers, 128 dims), CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"loss curves: {path}")


if __name__ == "__main__":
    main()
