"""`zoo train PRESET --data FILES --out DIR`: the command line of zoo.train; its flags are TrainConfig's fields."""
import argparse
import dataclasses
import json
import os
import sys

from ..allocator import keep_freed_memory
from ..data import VAL_FRACTION
from ..registry import PRESETS
from ..training import TrainConfig, train

HELP = "train or fine-tune a model on text files or conversations (JSONL), fully or with LoRA"
VAL_PERCENT = f"{VAL_FRACTION * 100:g}"


def add_arguments(p):
    p.add_argument("preset", nargs="?", help="preset name: the model config and its default training settings "
                                             "(optional with --init)")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files, or JSONL conversations ({\"messages\": [...]} or {\"prompt\": ..., "
                        "\"completion\": ...} per line: the loss counts the assistant's tokens only), or Hugging Face "
                        "datasets as hf:NAME[:CONFIG][@SPLIT] (pip install 'zoo-lm[datasets]'); the last "
                        f"{VAL_PERCENT}%% validates unless --val is given")
    p.add_argument("--val", nargs="+", metavar="PATH", help=f"validation text files instead of the last {VAL_PERCENT}%%")
    p.add_argument("--out", required=True, help="folder for checkpoints, log.jsonl and loss.png")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, with its model, data and settings (a larger "
                        "--max-iters continues up to it; a preset, --init, --data, --set or --tokenizer that differs "
                        "from the run's is refused)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out folder that holds a run: the old run is moved aside to OUT.old-N "
                        "(not deleted) once the settings, model and data have loaded")
    p.add_argument("--init", metavar="SOURCE", help="start from pretrained weights (preset, hub id, folder, .gguf)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="model config override")
    defaults = TrainConfig()
    preset_sets = {k for p in PRESETS.values() for k in p.train}
    for f in dataclasses.fields(TrainConfig):  # one flag per setting; unset flags leave the preset's value
        flag, kind = "--" + f.name.replace("_", "-"), f.metadata["type"]
        default = getattr(defaults, f.name)
        if f.name in preset_sets:
            help = f.metadata["help"] + f" (default: the preset's, else {default})"
        else:
            help = f.metadata["help"] + ("" if default is None or kind is bool else f" (default {default})")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            p.add_argument(flag, *f.metadata.get("aliases", ()), type=kind, default=None,
                           choices=f.metadata.get("choices"), help=help,
                           metavar=None if "choices" in f.metadata else f.name.upper())


def parse_overrides(pairs):
    """["n_layer=2", "bias=false"] -> {"n_layer": 2, "bias": False} (JSON values, else strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args):
    keep_freed_memory()  # a process setting: each step's tensors reuse the last one's memory (zoo/allocator.py)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if getattr(args, f.name) is not None}
    try:
        val_loss = train(args.preset, args.data, args.out, val=args.val, init=args.init, resume=args.resume, overwrite=args.overwrite,
                         overrides=parse_overrides(args.set), **fields)
    except FloatingPointError as e:  # diverged: say so plainly, the last good checkpoint stays
        print(f"zoo train: {e}", file=sys.stderr)
        return 1
    if val_loss is not None:  # rank 0 only
        print(f"val_loss {val_loss:.4f}", flush=True)
    if args.time_budget or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Everything is written and flushed. Skip the interpreter's teardown: with torch loaded it takes
        # seconds on a busy machine (outside any time budget), and a gloo job can abort during it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
