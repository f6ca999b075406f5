"""An int8 weight-only layer's product by row count: torch's int8 kernel against a GEMM over a transient
dequantized copy of the weight (what zoo/quantization.py's int8_mm picks from GEMM_ROWS rows on), in bf16 and
in float32 (the path on CPUs without bf16 arithmetic). SmolLM2-135M's layer shapes, bf16 activations (--dtype
float32: float32 activations and scales, as LoRA over int8 trains on a CPU without bf16 arithmetic).

    flock /tmp/bench.lock python bench/int8_matmul.py [--rows 1 32 128 2048] [--repeats 20] [--dtype float32]

Prints milliseconds per product (median of the repeats) and each GEMM's speed as a ratio to the kernel.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"q|k|v 960 x 576": (960, 576), "gate|up 3072 x 576": (3072, 576), "down 576 x 1536": (576, 1536)}


def timed(f, repeats):
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128, 512, 2048])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the activations' dtype")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.dtype} activations; ms per product (ratio: kernel / GEMM)")
    gemms = ["bf16", "fp32"] if dtype == torch.bfloat16 else ["fp32"]
    print(f"| layer | rows | int8 kernel | {' | '.join(f'{g} GEMM' for g in gemms)} |\n|---|---:|---:|"
          + "---:|" * len(gemms))
    for name, (n, k) in SHAPES.items():
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scales = (torch.rand(n, generator=g) / 100).to(dtype)
        for m in args.rows:
            x = torch.randn(m, k, generator=g).to(dtype)
            kernel = timed(lambda: torch.ops.aten._weight_int8pack_mm(x, codes, scales), args.repeats)
            times = {"bf16": lambda: F.linear(x, codes.to(torch.bfloat16).mul_(scales[:, None])),
                     "fp32": lambda: F.linear(x.float(), codes.float().mul_(scales.float()[:, None])).to(dtype)}
            cells = [f"{t:.2f} ({kernel / t:.1f}x)" for t in (timed(times[g], args.repeats) for g in gemms)]
            print(f"| {name} | {m} | {kernel:.2f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
