"""The `zoo` command line: `zoo list|generate|chat|train|eval|verify|inspect|serve|fill-mask|export`
(also `python -m zoo`).

Each command is a module in zoo/commands/ with `HELP`, `add_arguments(parser)` and `run(args) -> exit
code`; this file only routes to it, shows the library's notes on stderr, and turns bad input into one
`zoo COMMAND: error: ...` line with exit status 2.
"""
import argparse
import importlib
import os
import sys

from .sources import as_device

COMMANDS = ("list", "generate", "chat", "train", "eval", "verify", "inspect", "serve", "fill-mask", "export")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a flag argparse refuses: one line too (--help shows the usage)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = Parser(prog="zoo", description="single-file PyTorch language models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name in COMMANDS:
        modules[name] = importlib.import_module(f"zoo.commands.{name.replace('-', '_')}")
        modules[name].add_arguments(sub.add_parser(name, help=modules[name].HELP, description=modules[name].HELP))
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:  # every command's --device, before anything loads
            as_device(args.device)
        return modules[args.command].run(args) or 0
    # bad input: say what and how to fix, no traceback (OSErrors about the user's paths included)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"zoo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`zoo generate ... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so the exit's flush cannot raise again)
        return 1


if __name__ == "__main__":
    sys.exit(main())
