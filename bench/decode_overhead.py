"""Where a decode step's fixed cost goes, counted rather than timed: the torch operators one greedy decode step
dispatches (by name) and the Python function calls it makes (by where they live: zoo/generation.py and
sampling.py, the model file, torch.nn's module machinery, other torch code, builtins). Counts do not depend
on the machine's load, so this runs anywhere; each operator and call is fixed cost that a small model's
step pays on top of reading its weights.

    python bench/decode_overhead.py                           # SmolLM2-135M's shape, random weights
    python bench/decode_overhead.py --preset gpt2 --speculative   # also one prompt-lookup round of 5 drafts
"""
import argparse
import collections
import cProfile
import pstats

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.generation import _sample_steps, _speculative_steps
from zoo.sampling import SamplingConfig


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def origin(filename):
    for part, name in (("zoo/generation.py", "zoo/generation.py"), ("zoo/sampling.py", "zoo/sampling.py"),
                       ("zoo/speculative.py", "zoo/speculative.py"), ("/models/", "the model file"),
                       ("torch/nn/modules/module.py", "torch.nn.Module machinery"), ("torch", "other torch code")):
        if part in filename:
            return name
    return "builtins (C functions, torch ops' bindings)" if filename.startswith("~") else filename


def count(label, step):
    """Run step() once under each counter (after a warm-up call) and print what it dispatched and called."""
    step()
    with CountOps() as counter:
        step()
    profile = cProfile.Profile()
    profile.enable()
    step()
    profile.disable()
    stats = pstats.Stats(profile)
    calls = collections.Counter()
    for (filename, _, _), (_, ncalls, *_) in stats.stats.items():
        calls[origin(filename)] += ncalls
    print(f"\n{label}: {sum(counter.ops.values())} torch operators, {stats.total_calls} Python calls")
    for op, n in counter.ops.most_common(15):
        print(f"  {n:6d}  {op}")
    print("  Python calls by where they live:")
    for where, n in calls.most_common():
        print(f"  {n:6d}  {where}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--speculative", action="store_true", help="also count one prompt-lookup round")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = zoo.load(args.preset, dtype=args.dtype).eval()
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8] * 4]
    print(f"{args.preset} ({args.dtype}, random weights), batch 1, a {len(prompt[0])}-token prompt")
    greedy = SamplingConfig(temperature=0, eos_token_id=[])
    steps = _sample_steps(model, prompt, 64, [], greedy)
    next(steps)  # the prefill
    count("one decode step (plain)", lambda: next(steps))
    steps.close()
    if args.speculative:
        rounds = _speculative_steps(model, prompt, 64, [], greedy, "prompt-lookup", 5, {})
        next(rounds)
        count("one speculative round (prompt lookup, 5 drafts)", lambda: next(rounds))
        rounds.close()


if __name__ == "__main__":
    main()
