"""Mixture-of-experts speed: zoo's models/moe.py vs transformers' OlmoeForCausalLM on the same weights.

An OLMoE-shaped model with random weights (64 experts, top-8, q/k norm; fewer and narrower layers than
OLMoE-1B-7B's so that it fits beside other work): prefill tokens/s (one forward over a prompt, the next token's
logits only: zoo's last_only, transformers' logits_to_keep=1, as its generate does) and greedy decode tokens/s
(generate, batch 1: zoo eagerly and with its decode step compiled, compile=True, whose one-time compile is left
out as a warm-up), fp32 and bf16, 2 threads; bf16 adds zoo's prepacked model (zoo/prepack.py: what `zoo generate`,
`serve` and `chat` run); the sides in one process, their runs interleaved so that a busy machine slows them alike.
Prints each side's median and the ratio zoo / transformers.

    flock /tmp/bench.lock python bench/moe.py             # not a test: run it alone, on a quiet machine
    python bench/moe.py --layers 2 --repeats 1            # a quick check that it runs
"""
import argparse
import statistics
import tempfile
import time

import torch

import zoo
from zoo.prepack import prepack, reorders, widens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--expert-dim", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=256, help="prefill length")
    ap.add_argument("--new", type=int, default=64, help="decoded tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, OlmoeConfig

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=50304, hidden_size=a.embd, intermediate_size=a.expert_dim,
                         num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=16,
                         num_experts=a.experts, num_experts_per_tok=a.top_k, max_position_embeddings=4096,
                         pad_token_id=1, eos_token_id=None)
    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        ids = torch.randint(0, config.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(1))
        print(f"OLMoE-shaped: {a.layers} layers, n_embd {a.embd}, {a.experts} experts top-{a.top_k} of width "
              f"{a.expert_dim}; prompt {a.prompt}, {a.new} new tokens, {a.threads} threads, torch "
              f"{torch.__version__}")
        print(f"{'dtype':<9}{'':<19}{'zoo tok/s':>11}{'hf tok/s':>11}{'zoo/hf':>8}")
        for dtype in (torch.float32, torch.bfloat16):
            ours = zoo.from_pretrained(folder, dtype=dtype).eval()
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 1

            def prefill(run):
                t = time.perf_counter()
                with torch.no_grad():
                    run()
                return a.prompt / (time.perf_counter() - t)

            def decode(run):
                t = time.perf_counter()
                run()
                return a.new / (time.perf_counter() - t)

            prompt, hf_decode = ids[0, :32].tolist(), lambda: decode(lambda: hf.generate(
                ids[:, :32], max_new_tokens=a.new, do_sample=False, min_new_tokens=a.new))
            sides = {  # what: (zoo, transformers)
                "prefill": (lambda: prefill(lambda: ours(ids, last_only=True)),
                            lambda: prefill(lambda: hf(ids, logits_to_keep=1))),
                "decode": (lambda: decode(lambda: zoo.generate(ours, prompt, a.new, temperature=0)), hf_decode),
                "decode, compiled": (lambda: decode(lambda: zoo.generate(ours, prompt, a.new, temperature=0,
                                                                         compile=True)), hf_decode),
            }
            if reorders(w := next(ours.parameters())) or widens(w):  # (what prepack changes in a float model)
                packed = prepack(zoo.from_pretrained(folder, dtype=dtype).eval())
                sides["prefill, prepacked"] = (lambda: prefill(lambda: packed(ids, last_only=True)),
                                               sides["prefill"][1])
                sides["decode, prepacked"] = (lambda: decode(lambda: zoo.generate(packed, prompt, a.new,
                                                                                  temperature=0)), hf_decode)
            for what, (z, h) in sides.items():
                z(), h()  # warm-up
                runs = [(z(), h()) for _ in range(a.repeats)]  # interleaved
                zs, hs = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                print(f"{str(dtype).removeprefix('torch.'):<9}{what:<19}{zs:>11.1f}{hs:>11.1f}{zs / hs:>7.2f}x")


if __name__ == "__main__":
    main()
