"""An int8 weight-only layer's product by row count: torch's int8 kernel against a GEMM over a transient
dequantized copy of the weight (what zoo/quantization.py's int8_mm picks from GEMM_ROWS rows on), in bf16 and
in float32 (the path on CPUs without bf16 arithmetic). SmolLM2-135M's layer shapes, bf16 activations.

    flock /tmp/bench.lock python bench/int8_matmul.py [--rows 1 32 128 2048] [--repeats 20]

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
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per product (ratio: kernel / GEMM)")
    print("| layer | rows | int8 kernel | bf16 GEMM | fp32 GEMM |\n|---|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scales = (torch.rand(n, generator=g) / 100).to(torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            kernel = timed(lambda: torch.ops.aten._weight_int8pack_mm(x, codes, scales), args.repeats)
            bf16 = timed(lambda: F.linear(x, codes.to(torch.bfloat16).mul_(scales[:, None])), args.repeats)
            fp32 = timed(lambda: F.linear(x.float(), codes.float().mul_(scales.float()[:, None])).bfloat16(),
                         args.repeats)
            print(f"| {name} | {m} | {kernel:.2f} | {bf16:.2f} ({kernel / bf16:.1f}x) "
                  f"| {fp32:.2f} ({kernel / fp32:.1f}x) |")


if __name__ == "__main__":
    main()
