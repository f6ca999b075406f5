"""A training run's output folder: which folder a run may write to, its step-NNNNNNN checkpoints (saved
all-or-nothing, listed, resumed from the newest intact one) and the RNG states a resumed run restores.

    OUT/step-0000500/   the weights (zoo.save_pretrained; a LoRA run's adapter, zoo.save_adapter) and
                        training_state.pt (optimizer, schedule, RNG states, data position, settings)
    OUT/log.jsonl       the loss log (zoo/training.py)
"""
import dataclasses
import os
import random
import re
import shutil

import numpy as np
import torch

from . import adapters
from .distributed import full_state
from .progress import log as note
from .pretrained import CHECKPOINT_NAME, save_pretrained
from .registry import arch_of, build
from .sources import from_pretrained, load_lora_run

STATE_FILE = "training_state.pt"


def checkpoints_in(out):
    """The run's step-NNNNNNN folders, oldest first."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return [os.path.join(out, d) for d in sorted(names) if re.fullmatch(CHECKPOINT_NAME, d)]


def latest_checkpoint(out):
    found = checkpoints_in(out)
    return found[-1] if found else None


def holds_a_run(out):
    return os.path.isdir(out) and (os.path.exists(os.path.join(out, "log.jsonl")) or bool(checkpoints_in(out)))


def check_out(out, resume, overwrite, inputs=()):
    """Whether a run may write to `out`, before anything is read or trained: a run is never mixed into an old
    one or into the user's own files. A folder that holds a run, or other files (hidden ones aside: .DS_Store,
    .ipynb_checkpoints), is continued (resume: a run only) or, with overwrite, moved aside once training starts
    (returns True: move_aside); then none of the run's `inputs` (its init and data paths) may lie inside it. A
    file and a path inside one are refused."""
    existing = os.path.abspath(out)  # the path itself, else the nearest folder above it that exists
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(out) else f"is inside {existing!r}, which is a file"
        raise ValueError(f"out {out!r} {where}, not a folder: name a folder for the run's checkpoints and log")
    if resume:
        return False
    theirs = sorted(n for n in os.listdir(out) if not n.startswith(".")) if os.path.isdir(out) else []
    if not theirs:
        return False
    if not overwrite:
        what = "an earlier run (log.jsonl / step-* checkpoints)" if holds_a_run(out) else \
            f"files that are not a zoo run ({', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''})"
        raise ValueError(f"out {out!r} holds {what}: " + ("continue it with resume (--resume), " if holds_a_run(out)
                         else "") + "start again with overwrite (--overwrite; what is there is moved aside to "
                         "OUT.old-N), or name another folder")
    root = os.path.realpath(out)
    for path in inputs:  # they would move with it, under the new run's feet (a LoRA base recorded by its path)
        if path and os.path.exists(path) and os.path.commonpath([os.path.realpath(path), root]) == root:
            raise ValueError(f"{path!r} is inside out {out!r}, which overwrite (--overwrite) moves aside: copy it "
                             "out first, or write the new run to another folder")
    return True


def first_free(path, suffix):
    """`path` + suffix + N for the first N from 1 that names nothing yet."""
    n = 1
    while os.path.exists(f"{path}{suffix}{n}"):
        n += 1
    return f"{path}{suffix}{n}"


def move_aside(out):
    """Move what `out` holds to OUT.old-N (the first N free), never deleting it, and say so."""
    aside = first_free(out.rstrip(os.sep), ".old-")
    os.replace(out, aside)
    note.warning("zoo: %s was moved to %s", out, aside)


def resume_point(out):
    """(folder, training state, model) of the newest intact checkpoint in `out`. A damaged one (weights or
    training state that do not read) is named on the "zoo" logger and left in place; the one before it is
    tried. No checkpoint at all is a FileNotFoundError."""
    found = checkpoints_in(out)
    for ckpt in reversed(found):
        try:
            state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True)
        except Exception as e:  # a truncated zip, a missing file: torch raises several kinds
            note.warning("zoo: %s is damaged (%s: %s); trying the checkpoint before it",
                         os.path.join(ckpt, STATE_FILE), type(e).__name__, (str(e).splitlines() or [""])[0])
            continue
        try:
            if adapters.is_lora_run(ckpt):  # a LoRA run: its base and adapter (over int8: in the dtype it trained in)
                trained_in = getattr(torch, adapters.read_base(ckpt).get("dtype", "bfloat16"))
                model = load_lora_run(ckpt, int8_dtype=trained_in)
            else:
                model = build(state["arch"], state["config"])
                model.load_state_dict(from_pretrained(ckpt).state_dict())
        except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
            note.warning("zoo: the weights in %s are damaged (%s); trying the checkpoint before it", ckpt,
                         (str(e).splitlines() or [""])[0])
            continue
        if ckpt != found[-1]:
            note.warning("zoo: resuming from %s, the newest intact checkpoint (the damaged ones are left as they "
                         "are)", ckpt)
        return ckpt, state, model
    if found:
        raise ValueError(f"resume: every checkpoint in {out!r} is damaged ({', '.join(map(os.path.basename, found))})"
                         "; nothing to continue from")
    raise FileNotFoundError(f"resume: no checkpoint (step-*) in {out!r} to continue from")


def rng_states():
    """Every RNG the run touches, as lists and tensors so torch.load(weights_only=True) reads them."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(state), gauss], numpy=[name, torch.from_numpy(keys.astype(np.int64)),
                                                             pos, has_gauss, cached],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(r):
    random.setstate((r["python"][0], tuple(r["python"][1]), r["python"][2]))
    name, keys, pos, has_gauss, cached = r["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(r["torch"])
    if r["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(r["cuda"])


def save_checkpoint(out, step, model, tokenizer, optimizer, horizon, batch_rng, s, master=True, dpo=None, inputs=None):
    """OUT/step-NNNNNNN: weights + tokenizer (zoo.save_pretrained; a LoRA run's adapter, zoo.save_adapter) and
    the training state (with a DPO run's reference: preference.prepare; with what the run started from, `inputs`:
    training.started_from), all-or-nothing, written by rank 0. Under FSDP every rank calls it (the full state is
    gathered from the shards)."""
    weights, optimizer_state = full_state(model, optimizer, s.fsdp)
    if not master:
        return None
    arch = arch_of(model)
    if s.fsdp:  # the gathered tensors, in a plain model of the same config, so the folder reads as any other
        model = build(arch, model.config)
        model.load_state_dict(weights)
    final = os.path.join(out, f"step-{step:07d}")
    tmp = os.path.join(out, f".tmp-step-{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapters.has_lora(model):  # a LoRA run: the adapter alone (PEFT's layout) and base.json, naming its base
        adapters.save_adapter(model, tmp, tokenizer=tokenizer)
    else:
        save_pretrained(model, tmp, tokenizer=tokenizer)
    torch.save(dict(step=step, horizon=horizon, optimizer=optimizer_state, rng=rng_states(),
                    data=batch_rng.get_state(), arch=arch, config=dataclasses.asdict(model.config),
                    settings=vars(s), **({"dpo": dpo} if dpo else {}), **({"inputs": inputs} if inputs else {})),
               os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):  # resumed before a damaged checkpoint: keep it, under another name
        os.replace(final, first_free(final, ".damaged-"))
    os.replace(tmp, final)  # a crash before this line leaves only the .tmp folder, never a broken step-*
    return final
