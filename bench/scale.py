"""Memory of training past one process: DDP vs FSDP2 per-rank state, and activation checkpointing.

    python bench/scale.py                       # gpt2-medium, 2 ranks (gloo on CPU), then gpt2 at block 1024
    python bench/scale.py --model gpt2 --ranks 2

Part 1 runs two training steps under torchrun with DDP and with FSDP (zoo's own wrapping: zoo.distributed)
and reports, per rank, the bytes of parameters + gradients + AdamW state that rank holds (local shards for
FSDP) and the rank's peak resident memory. Part 2 runs one process at a long block size with and without
activation checkpointing and reports peak resident memory. Then it prints what to expect on GPUs for
gpt2-xl and tinyllama-1.1b (computed from the parameter counts: fp32 weights, gradients and AdamW's two
moments, 16 bytes per parameter, sharded over the ranks by FSDP).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def state_bytes(model, optimizer):
    """Bytes this process holds for parameters, their gradients and the optimizer's state."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(local(p).numel() * local(p).element_size() for p in params)
    total += sum(local(p.grad).numel() * local(p.grad).element_size() for p in params if p.grad is not None)
    for state in optimizer.state.values():
        total += sum(local(v).numel() * local(v).element_size() for v in state.values() if hasattr(v, "numel"))
    return total


def worker(args):
    """One rank: build, wrap, two steps; print a JSON line of its numbers."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import zoo
    from zoo import distributed

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = zoo.load(args.model)
    if args.engine == "fsdp":
        distributed.shard(model, bf16=False)
        net = model
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, model.config.vocab_size, (1, args.block + 1))
    t = time.time()
    for _ in range(2):
        loss = F.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients: they are part of the state to count
    row = dict(engine=args.engine, rank=dist.get_rank(), state_mb=state_bytes(model, optimizer) / 2**20,
               peak_rss_mb=rss_peak_mb(), step_s=(time.time() - t) / 2)
    print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def activations(args):
    """One process, one training step at a long block size; peak RSS (the weights, gradients and
    optimizer state are the same with and without checkpointing, so the difference is activations)."""
    import torch
    import torch.nn.functional as F

    import zoo
    from zoo import distributed
    torch.manual_seed(0)
    model = zoo.load(args.model)
    if args.checkpoint:
        distributed.checkpoint_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.block + 1))
    t = time.time()
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    print(json.dumps(dict(checkpoint=args.checkpoint, peak_rss_mb=rss_peak_mb(), step_s=time.time() - t)), flush=True)


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--block", type=int, default=128, help="tokens per sequence in part 1")
    p.add_argument("--act-model", default="gpt2")
    p.add_argument("--act-block", type=int, default=1024)
    p.add_argument("--act-batch", type=int, default=4)
    p.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    p.add_argument("--activations", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.engine = args.worker
        return worker(args)
    if args.activations:
        return activations(args)

    import torch

    import zoo
    with torch.device("meta"):
        n = sum(t.numel() for t in zoo.load(args.model).parameters())
    print(f"{args.model}: {n / 1e6:.1f}M parameters, {args.ranks} ranks (gloo, CPU), block {args.block}\n")
    rows = {}
    for engine in ("ddp", "fsdp"):
        rows[engine] = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={args.ranks}", __file__, "--worker", engine, "--model", args.model,
                            "--block", str(args.block)])
    print("| engine | per-rank params + grads + AdamW state MB | vs DDP | peak RSS per rank MB | s/step |")
    print("|---|---:|---:|---:|---:|")
    ddp = max(r["state_mb"] for r in rows["ddp"])
    for engine, label in (("ddp", "DDP"), ("fsdp", "FSDP2 (fully_shard per block)")):
        state = max(r["state_mb"] for r in rows[engine])
        rss = max(r["peak_rss_mb"] for r in rows[engine])
        step = max(r["step_s"] for r in rows[engine])
        print(f"| {label} | {state:,.0f} | {state / ddp:.2f}x | {rss:,.0f} | {step:.1f} |")

    print(f"\n{args.act_model}, one process, batch {args.act_batch} x {args.act_block} tokens, one training step\n")
    print("| activation checkpointing | peak RSS MB | s/step |")
    print("|---|---:|---:|")
    for flag in ([], ["--checkpoint"]):
        (r,) = run([sys.executable, __file__, "--activations", "--model", args.act_model, "--block",
                    str(args.act_block), "--batch", str(args.act_batch), *flag])
        print(f"| {'on' if flag else 'off'} | {r['peak_rss_mb']:,.0f} | {r['step_s']:.1f} |")

    print("\nOn GPUs (fp32 weights + gradients + AdamW moments = 16 bytes per parameter, before activations):\n")
    print("| model | parameters | DDP per rank GB | FSDP 2 ranks | FSDP 4 ranks | FSDP 8 ranks |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("gpt2-xl", "tinyllama-1.1b"):
        with torch.device("meta"):
            count = sum(t.numel() for t in zoo.load(name).parameters())
        gb = 16 * count / 1e9
        print(f"| {name} | {count / 1e9:.2f}B | {gb:.1f} | " + " | ".join(f"{gb / k:.1f}" for k in (2, 4, 8)) + " |")


if __name__ == "__main__":
    main()
