"""The `zoo` command line: `zoo list|generate|train|eval|verify` (also `python -m zoo`).

Each command lives beside the code it drives: its module defines `add_arguments(parser)` and
`run(args) -> exit code`, and this file only routes to it.
"""
import argparse
import importlib
import sys

COMMANDS = {  # name -> (module, one-line help)
    "list": ("zoo.registry", "list the presets with sizes, weight sources and licences"),
    "generate": ("zoo.generation", "generate text (default model: smollm2-135m-instruct)"),
    "train": ("zoo.training", "train or fine-tune a model on text files"),
    "eval": ("zoo.evaluation", "validation loss and sliding-window perplexity"),
    "verify": ("zoo.verification", "compare zoo's logits with transformers' on the same weights"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="zoo", description="single-file PyTorch language models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module, help) in COMMANDS.items():
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(sub.add_parser(name, help=help, description=help))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input: say what and how to fix, no traceback
        print(f"zoo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
