"""The zoo's row kernels (zoo/kernels.py) against torch's _weight_int4pack_mm_for_cpu on SmolLM2-135M's shapes, groups
of 32, M rows of x, interleaved in one process: int4_rows on the layers torch packed, and int8_rows on the tied Q8_0
head's row-major codes against torch's kernel over the head's two 4-bit planes (what the head ran before). Where
torch's CPU build packs int4 codes in blocks of 32 rows (its AVX2 build) or 64 (AVX-512), else it says so and stops.

    flock /tmp/bench.lock python bench/int4_rows.py              # not a test: run it alone, on a quiet machine
    flock /tmp/bench.lock python bench/int4_rows.py --dtype float32 --rows 1
"""
import argparse
import statistics
import time

import torch

from zoo import kernels
from zoo.quantization import packed_block_rows

SHAPES = {"q, o (576 x 576)": (576, 576), "k, v (192 x 576)": (192, 576), "gate, up (1536 x 576)": (1536, 576),
          "down (576 x 1536)": (576, 1536), "head (49152 x 576): int8_rows / planes": (49152, 576)}


def timed(fn, repeats):
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="activations and scales")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    block_rows = packed_block_rows()
    if block_rows is None or kernels.int4_rows() is None:
        why = kernels.build_error() or "torch packs a layout the zoo does not know"
        raise SystemExit(f"no int4 row kernel here: {why}")
    dtype, g = getattr(torch, args.dtype), torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}: blocks of {block_rows} rows), "
          f"{args.threads} threads, {args.dtype} activations, groups of 32; "
          f"us per product, median of {args.rounds} rounds (range)")
    print("| layer | rows | torch's kernel us | zoo's us | torch / zoo |")
    print("|---|---:|---:|---:|---:|")
    for name, (N, K) in SHAPES.items():
        head = "int8_rows" in name  # 8-bit codes: torch's kernel over two 4-bit planes of K inputs each
        codes = torch.randint(0, 16, (N, 2 * K if head else K), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = (torch.rand(codes.shape[1] // 32, N, 2, generator=g) * 0.02).to(dtype)
        rows8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        scales8 = (torch.rand(N, K // 32, generator=g) * 0.02).to(dtype)
        for M in args.rows:
            x = torch.randn(M, K, generator=g).to(dtype)
            xx = torch.cat((x, x), 1) if head else x
            repeats = max(5, int(2e5 / (N * K / 1e3) / M))
            theirs, ours = [], []
            for _ in range(args.rounds):
                theirs.append(timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xx, packed, 32, sz), repeats))
                ours.append(timed(lambda: kernels.int8_rows()(x, rows8, scales8, None) if head else
                                  kernels.int4_rows()(x, packed, 32, sz, block_rows), repeats))
            ratios = [t / o for t, o in zip(theirs, ours)]
            print(f"| {name} | {M} | {statistics.median(theirs):.1f} | {statistics.median(ours):.1f} | "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
