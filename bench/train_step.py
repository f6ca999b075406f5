"""One training step of `shakespeare-char`, the zoo's against nanoGPT's, interleaved in one process on the same batches.

    python bench/train_step.py [--nanogpt /work/peer/nanoGPT] [--rounds 4] [--steps 40]

Both models have nanoGPT's CPU baby config (4 layers, 4 heads, 128 dims, block 64, batch 12) in float32, as both train
on a CPU without bf16 arithmetic (the zoo's preset asks for bf16 autocast; zoo/training.py drops it there). A step is
forward, loss, backward, gradient clipping to 1.0 and AdamW: the zoo's through HeadLoss and its fused AdamW, nanoGPT's
through its model.py and configure_optimizers (its code is imported from a checkout, never copied here). Prints each
round's ms per step and the ratio, then the share of the zoo's step in `aten::mm`: the float32 matmuls, the same work
on both sides, which bound the ratio from above however fast everything else becomes.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402
from zoo.allocator import keep_freed_memory  # noqa: E402
from zoo.loss import HeadLoss  # noqa: E402
from zoo.training import AdamW  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", default="/work/peer/nanoGPT", help="a nanoGPT checkout")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="steps per side and round")
    args = p.parse_args()
    sys.path.insert(0, args.nanogpt)
    from model import GPT, GPTConfig  # nanoGPT's

    keep_freed_memory()  # as `zoo train` does for its process
    torch.manual_seed(0)
    batches = torch.randint(0, 65, (200, 2, 12, 64))  # (x, y) pairs of 12 x 64 characters
    ours = zoo.load("shakespeare-char")
    loss_of, opt = HeadLoss(ours), AdamW(ours.parameters(), lr=1e-3, fused=True)
    theirs = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))
    their_opt = theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    i = 0

    def zoo_step():
        nonlocal i
        x, y = batches[i % len(batches)]
        i += 1
        loss_of(ours, x, y).backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def nanogpt_step():
        nonlocal i
        x, y = batches[i % len(batches)]
        i += 1
        theirs(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)

    sides = {"zoo": zoo_step, "nanoGPT": nanogpt_step}
    for step in sides.values():  # warm-up
        for _ in range(10):
            step()
    ms = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, step in sides.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            ms[name].append((time.perf_counter() - t) / args.steps * 1e3)
    print(f"shakespeare-char step, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, v in ms.items():
        print(f"{name:8s} " + " ".join(f"{t:.1f}" for t in v) + f" ms  ({min(v):.1f}-{max(v):.1f})")
    ratios = [b / a for a, b in zip(ms["zoo"], ms["nanoGPT"])]
    print("nanoGPT / zoo, round by round: " + " ".join(f"{r:.2f}x" for r in ratios))
    with torch.profiler.profile() as prof:
        for _ in range(20):
            zoo_step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm")
    print(f"zoo step: aten::mm {mm / total:.0%} of its operators' time ({mm / 20 / 1e3:.1f} ms a step)")


if __name__ == "__main__":
    main()
