"""Training speed and quality on the characters of tiny Shakespeare: zoo vs nanoGPT, side by side.

    python bench/train_shakespeare.py [--nanogpt /work/peer/nanoGPT] [--png bench/train_shakespeare.png]

Three runs, one after the other, on the same machine (use `flock /tmp/bench.lock` on a shared one):
  1. nanoGPT's train.py (from a nanoGPT checkout, run in a temporary copy; its code never enters this
     repository) on nanoGPT's CPU baby config: 4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iters.
  2. `zoo train shakespeare-char ... --max-iters 2000 --batch-size 12 --block-size 64`: the same model
     and batch shape, so tokens/s compare directly.
  3. `zoo train shakespeare-char ... --time-budget 95`: the preset's own training settings, 95 s of wall
     time in all (nanoGPT's run above takes about that long).
Prints a table (tokens/s, ratio to nanoGPT, final validation loss, wall time) and writes the loss
curves to bench/train_shakespeare.png.
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


def nanogpt(checkout, work):
    """nanoGPT's own train.py on the baby config; returns (tok/s, final val loss, wall, [(iter, val)])."""
    copy = Path(work) / "nanoGPT"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out*"))
    data = copy / "data" / "shakespeare_char"
    shutil.copy(TEXT, data / "input.txt")  # prepare.py downloads it otherwise
    run([sys.executable, "prepare.py"], cwd=data)
    out, wall = run([sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
                     "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
                     "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000",
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
    args = p.parse_args()
    if not TEXT.is_file():
        sys.exit(f"{TEXT} is missing")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        if os.path.isdir(args.nanogpt):
            results["nanoGPT, 2000 iters"] = nanogpt(args.nanogpt, work)
        else:
            print(f"note: no nanoGPT checkout at {args.nanogpt}; zoo alone", file=sys.stderr)
        results["zoo, 2000 iters"] = zoo(os.path.join(work, "zoo-2000"), "--max-iters", "2000", "--batch-size", "12",
                                         "--block-size", "64", "--log-interval", "1")  # per-step times, as nanoGPT
        results["zoo, --time-budget 95"] = zoo(os.path.join(work, "zoo-95s"), "--time-budget", "95")

    base = results.get("nanoGPT, 2000 iters", (None,))[0]
    print("\n| run | tokens/s (median step) | vs nanoGPT | final val loss | wall | tokens/s (2000 iters / wall) |")
    print("|---|---|---|---|---|---|")
    for name, (tok_s, val, wall, *_) in results.items():
        ratio = f"{tok_s / base:.2f}x" if base else "-"
        whole = f"{2000 * TOKENS_PER_ITER / wall:,.0f}" if "2000" in name else "-"
        print(f"| {name} | {tok_s:,.0f} | {ratio} | {val:.3f} | {wall:.1f} s | {whole} |")
    plot(results, args.png)


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
