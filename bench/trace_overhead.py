"""What inspection costs a forward pass that does not ask for it: SmolLM2-135M's shape (random weights), a prompt's
prefill and one-token decode steps through the KV cache, timed three ways, interleaved round by round:

  plain      each attention's `attend` replaced by a plain function calling SDPA: the model files before
             zoo/inspection.py, which needed the Attend module (see models/__init__.py)
  as is      the model as the files build it: one more module call per layer, no hooks
  after      the same model after a zoo.trace(..., attention=True) and a zoo.intervene block have come and gone

    flock /tmp/bench.lock python bench/trace_overhead.py [--prompt 128] [--repeats 30] [--dtype float32]

Prints milliseconds per call (median of the repeats) and each as a ratio to `plain`. Run on a quiet machine:
the differences are microseconds.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import zoo
from zoo.inspection import zero_heads


def sdpa(q, k, v, mask, causal, dropout_p=0.0, scale=None):
    """Attend.forward's computation as a plain function: no module call."""
    (B, H, T, D), H_kv = q.shape, k.size(1)
    if T == 1 and H > H_kv:
        y = F.scaled_dot_product_attention(q.reshape(B, H_kv, H // H_kv, D), k, v, attn_mask=mask, scale=scale)
        return y.view(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal, scale=scale,
                                          enable_gqa=H > H_kv)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=128, help="prefill length (default 128)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    torch.manual_seed(0)
    model = zoo.load("smollm2-135m-instruct", dtype=args.dtype).eval()
    attention = [m for m in model.modules() if hasattr(m, "attend")]
    idx = torch.randint(0, model.config.vocab_size, (1, args.prompt))
    model.setup_cache(1, args.prompt + 1)

    def prefill():
        model(idx, last_only=True)

    def decode():
        model(idx[:, :1], input_pos=torch.tensor([args.prompt]))

    modules = [m.attend for m in attention]

    def plain(flag):  # each attention's attend: the plain function, or its Attend module again
        for m, module in zip(attention, modules):
            del m.attend
            m.attend = sdpa if flag else module

    kinds = ("plain", "as is", "after")
    times = {(k, step): [] for k in kinds for step in ("prefill", "decode")}
    with torch.no_grad():
        for _ in range(args.repeats):
            for kind in kinds:
                plain(kind == "plain")
                if kind == "after":
                    zoo.trace(model, idx[:, :8], attention=True)
                    with zoo.intervene(model, {"model.layers.0.self_attn.attend": zero_heads(0)}):
                        model(idx[:, :8])
                for step, f in (("prefill", prefill), ("decode", decode)):
                    f()
                    t = time.perf_counter()
                    f()
                    times[kind, step].append(time.perf_counter() - t)
            plain(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; prefill of {args.prompt} "
          f"tokens and one decode step; ms (median of {args.repeats}), ratio to plain")
    print("| step | plain | as is | after a trace |\n|---|---:|---:|---:|")
    for step in ("prefill", "decode"):
        base = statistics.median(times["plain", step]) * 1e3
        cells = [f"{base:.3f}"]
        for kind in ("as is", "after"):
            ms = statistics.median(times[kind, step]) * 1e3
            cells.append(f"{ms:.3f} ({ms / base:.3f}x)")
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
