"""Decoding's attention: the zoo's kernel (zoo/kernels.py's attend, what prepack's CacheAttend runs) against torch's
SDPA as the model files call it for one query (the query heads sharing a key/value head as rows of one head), over
the first S slots of a KV cache with a mask, on SmolLM2-135M's heads (9 query heads, 3 key/value heads, 64
dimensions) and Gemma 3 270M's (4, 1, 256), interleaved in one process.

    flock /tmp/bench.lock python bench/attend.py                  # not a test: run it alone, on a quiet machine
    flock /tmp/bench.lock python bench/attend.py --dtype float32 --slots 160 4096
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from zoo import kernels

HEADS = {"SmolLM2 (9 / 3 heads of 64)": (9, 3, 64), "Gemma 3 270M (4 / 1 heads of 256)": (4, 1, 256)}


def timed(fn, repeats):
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def sdpa(q, k, v, mask):  # models/llama.py's Attend for one query
    B, H, _, D = q.shape
    return F.scaled_dot_product_attention(q.reshape(B, k.size(1), H // k.size(1), D), k, v,
                                          attn_mask=mask).view(B, H, 1, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--slots", type=int, nargs="*", default=[32, 160, 1024, 4096], help="keys attended over")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    op = kernels.attend()
    if op is None:
        raise SystemExit(f"the zoo's kernels are not built here: {kernels.build_error()}")
    dtype, g = getattr(torch, args.dtype), torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, one query; us per layer's attention, "
          f"median of {args.rounds} rounds (range of the ratio)")
    print("| heads | keys | SDPA us | zoo's us | SDPA / zoo |")
    print("|---|---:|---:|---:|---:|")
    for name, (H, H_kv, D) in HEADS.items():
        for S in args.slots:
            cache = torch.randn(2, 1, H_kv, S + 64, D, generator=g).to(dtype)
            k, v = cache[0, :, :, :S], cache[1, :, :, :S]  # (the cache's first S slots, as the model files pass them)
            q = torch.randn(1, H, 1, D, generator=g).to(dtype)
            mask = torch.zeros(1, 1, 1, S, dtype=dtype)
            torch.testing.assert_close(op(q, k, v, mask, True, None).float(), sdpa(q, k, v, mask).float(),
                                       rtol=0.02, atol=0.02)
            repeats = max(20, int(2e4 / S))
            theirs, ours = [], []
            with torch.no_grad():
                for _ in range(args.rounds):
                    theirs.append(timed(lambda: sdpa(q, k, v, mask), repeats))
                    ours.append(timed(lambda: op(q, k, v, mask, True, None), repeats))
            ratios = [t / o for t, o in zip(theirs, ours)]
            print(f"| {name} | {S} | {statistics.median(theirs):.1f} | {statistics.median(ours):.1f} | "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
