"""Preference tuning: Direct Preference Optimization (DPO, Rafailov et al., 2023) and its IPO form.

    zoo.train(None, ["prefs.jsonl"], "out/", init="smollm2-135m-instruct", objective="dpo", beta=0.1, lora_r=16)
    zoo train --init smollm2-135m-instruct --data prefs.jsonl --objective dpo --beta 0.1 --lora 16 --out out/

Data: JSONL files (or hf: datasets with these columns) of pairs of answers to one prompt, the preferred first,

    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]}

TRL's formats. Each answer becomes a sequence as chat SFT makes it (zoo/chat_data.py: plain text for
strings, the chat template for messages) and counts only its answer's tokens: the template's markup and
the earlier turns of a conversational prompt are context. A sequence longer than block_size + 1 tokens
loses tokens from the start of its prompt (the answer is what is scored); one whose answer alone is too
long keeps its answer's beginning. Both are counted in a warning.

The loss of a pair, with the policy's and the reference model's summed log-probabilities of the answers
(log pi, log pi_ref) and the rewards r = beta (log pi - log pi_ref) of each answer:

    sigmoid: -(1 - eps) log sigmoid(r_chosen - r_rejected) - eps log sigmoid(r_rejected - r_chosen)
             (eps = label_smoothing: cDPO, the chance that a pair's labels are flipped; 0: DPO itself)
    ipo:     ((log-ratio_chosen / n_chosen - log-ratio_rejected / n_rejected) - 1 / (2 beta))^2
             (Azar et al., 2023, eq. 17, the log-ratios per answer token as TRL computes them)

The reference model is the one training starts from: with LoRA, the same weights with the adapters
switched off (no second copy); without, a frozen copy; or, with reference="precomputed", its
log-probabilities of every pair computed once before training (no reference forward pass per step, and
no copy: what makes full fine-tuning fit). Logged per interval and on the validation pairs: the loss,
the mean reward margin, the reward accuracy (the share of pairs whose chosen answer has the larger
reward) and the mean log-probabilities of the chosen and the rejected answers.
"""
import copy
import json
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import chat_data, lora
from .data import IGNORE, VAL_FRACTION
from .loss import hidden_state, target_logps
from .sources import load_source
from .progress import log

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("live", "precomputed")
METRICS = ("loss", "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected", "logps_chosen",
           "logps_rejected")


# ---------------------------------------------------------------------------------------- data

def is_preference(paths):
    """Whether the data sources hold preference pairs (their first rows have prompt, chosen and rejected)."""
    return bool(paths) and all(_first_keys(p) >= {"prompt", "chosen", "rejected"} for p in paths)


def _first_keys(path):
    if path.startswith(chat_data.HF_PREFIX):
        return set(chat_data.hf_rows(path).column_names)
    try:
        with open(path, encoding="utf-8") as f:
            row = json.loads(next((line for line in f if line.strip()), "null"))
    except (OSError, UnicodeDecodeError, ValueError):
        return set()  # (not a JSONL file: the text reader says what is wrong with it)
    return set(row) if isinstance(row, dict) else set()


def read_pairs(paths):
    """[(where, row)]: every pair of the sources, checked for its three fields."""
    rows = chat_data.read_rows(paths)
    for where, row in rows:
        if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= set(row):
            raise ValueError(f"{where}: expected {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}, got keys "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
    return rows


def encode_pair(row, tokenizer):
    """((ids, answer), (ids, answer)) of the chosen and the rejected sequence: token ids and, for each,
    whether it belongs to the answer (the tokens the log-probability sums)."""
    prompt, answers = row["prompt"], (row["chosen"], row["rejected"])
    if isinstance(prompt, str) and all(isinstance(a, str) for a in answers):  # plain text, as SFT's pairs
        return tuple(chat_data.encode({"prompt": prompt, "completion": a}, tokenizer) for a in answers)
    if not (isinstance(prompt, list) and all(isinstance(a, list) for a in answers)):
        raise ValueError("prompt, chosen and rejected must all be strings (plain text) or all lists of messages")
    for a in answers:
        if not a or not all(isinstance(m, dict) and m.get("role") == "assistant" for m in a):
            raise ValueError("chosen and rejected must be lists of assistant messages (the answers to the prompt)")
    earlier = sum(isinstance(m, dict) and m.get("role") == "assistant" for m in prompt)
    out = []
    for a in answers:
        ids, trained = chat_data.encode_messages(prompt + a, tokenizer)
        out.append((ids, _after_runs(trained, earlier)))  # the prompt's own assistant turns are context
    return tuple(out)


def _after_runs(marks, n):
    """marks with its first n runs of True set to False."""
    out, runs, previous = [], 0, False
    for m in marks:
        runs += m and not previous
        previous = m
        out.append(m and runs > n)
    return out


def _fit(ids, answer, limit):
    """(ids, answer, what was cut: None, "prompt" or "answer") of a sequence cut to `limit` tokens: from the
    start of its prompt, keeping one token of context before the answer; then, if the answer alone is too
    long, from the answer's end."""
    if len(ids) <= limit:
        return ids, answer, None
    start = answer.index(True)
    keep = max(1, limit - (len(ids) - start))  # prompt tokens that fit beside the whole answer
    what = "answer" if len(ids) - start + keep > limit else "prompt"
    return ids[start - keep:][:limit], answer[start - keep:][:limit], what


def tokenize(pairs, tokenizer, block_size, vocab_size=None):
    """[(chosen ids, chosen answer, rejected ids, rejected answer)] as numpy arrays, cut to block_size + 1
    tokens (see _fit; a warning counts the cut pairs)."""
    out, cut = [], {"prompt": 0, "answer": 0}
    for where, row in pairs:
        try:
            encoded = encode_pair(row, tokenizer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        sides = []
        for ids, answer in encoded:
            if not any(answer[1:]):
                raise ValueError(f"{where}: an answer has no tokens to score")
            ids, answer, what = _fit(ids, answer, block_size + 1)
            sides += [np.array(ids, dtype=np.int64), np.array(answer, dtype=bool)]
            if what:
                cut[what] += 1
        out.append(tuple(sides))
    if cut["prompt"] or cut["answer"]:
        log.warning("zoo: of %d preference pairs' %d sequences, %d were longer than block_size + 1 = %d tokens and "
                    "lost the start of their prompt%s", len(pairs), 2 * len(pairs), cut["prompt"] + cut["answer"],
                    block_size + 1, f"; {cut['answer']} of them also the end of their answer" if cut["answer"] else "")
    if vocab_size is not None and out and max(int(p[0].max()) for p in out) >= vocab_size:
        raise ValueError(f"the tokenizer's ids reach beyond the model's vocab_size {vocab_size}; is it the model's "
                         "own tokenizer?")
    return out


class Targets(NamedTuple):
    """What a batch of pairs is scored against: y [2B, T], the next tokens with IGNORE off the answers, rows
    0..B-1 the chosen answers and B..2B-1 the rejected ones; ref [2B], the reference model's log-probabilities
    of the same rows when they were computed before training (else None)."""
    y: torch.Tensor
    ref: torch.Tensor | None


class Pairs(chat_data.Conversations):
    """Preference pairs as batches of 2B right-padded rows (all the chosen answers, then the rejected ones);
    the interface of data.Windows (draw, fixed, batch), a batch's targets a Targets. ref: [pairs, 2] float32,
    the reference model's log-probabilities (chosen, rejected) of each pair, once computed (precompute)."""

    def __init__(self, pairs, pad_id):
        super().__init__([(p[0], p[1]) for p in pairs] + [(p[2], p[3]) for p in pairs], pad_id)
        self.n, self.ref = len(pairs), None

    def __len__(self):
        return self.n

    def batch(self, index, device="cpu"):
        x, y = super().batch(torch.cat([index, index + self.n]), device)
        ref = None if self.ref is None else self.ref[index].t().flatten().to(device)  # [2B]: chosen, then rejected
        return x, Targets(y, ref)


def load_splits(paths, tokenizer, val_paths=None, block_size=1024, vocab_size=None):
    """(train, val) Pairs; validation is the last VAL_FRACTION of the pairs (at least one) unless val_paths
    are given."""
    pairs = [read_pairs(paths), read_pairs(val_paths) if val_paths else None]
    if tokenizer.chat_template is None and any(isinstance(p["prompt"], list) for part in pairs if part
                                               for _, p in part):
        raise ValueError("the tokenizer has no chat template to render conversations with; use a chat model's "
                         "tokenizer (--tokenizer) or plain-text pairs")
    pad = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    train, val = chat_data.split(pairs, lambda part: tokenize(part, tokenizer, block_size, vocab_size),
                                 "preference pairs")
    return Pairs(train, pad), Pairs(val, pad)


# ---------------------------------------------------------------------------------------- the loss

def sequence_logps(model, x, y, net=None):
    """(logps [R], counts [R]): each row's summed log-probability of its targets that are not IGNORE under the
    model, computed in float32, and how many there are. net: what runs the forward pass (the model, or DDP /
    torch.compile around it). The output layer runs on the answers' positions only, a chunk at a time
    (zoo/loss.py): never the whole [R, T, vocab_size] logits."""
    hidden = hidden_state(net or model, model, x)  # [R, T, C]
    valid = y != IGNORE  # [R, T]
    logp = target_logps(model, hidden[valid], y[valid])  # [K]: the valid targets, row by row
    return torch.zeros_like(y, dtype=logp.dtype).masked_scatter(valid, logp).sum(-1), valid.sum(-1)


def dpo_loss(logps, ref_logps, counts, beta, label_smoothing=0.0, loss="sigmoid"):
    """(losses [B], chosen rewards [B], rejected rewards [B]) of B pairs from the policy's and the reference's
    log-probabilities and the answers' token counts, each [2B] (chosen rows, then rejected); see the module's
    docstring. The rewards are beta times the log-ratios, without gradient."""
    ratio = logps - ref_logps  # [2B]
    chosen, rejected = ratio.chunk(2)
    if loss == "sigmoid":
        z = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss == "ipo":
        n_chosen, n_rejected = counts.chunk(2)
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    rewards = beta * ratio.detach()
    return (losses, *rewards.chunk(2))


class Reference:
    """The reference model's log-probabilities of a batch: the model itself with its LoRA adapters off, or a
    frozen copy of it as it is now (a model without adapters)."""

    def __init__(self, model, keep=True):
        """keep: hold a frozen copy of a model without adapters (its weights are about to change); False: use
        the model as it is (a reference read before training starts)."""
        self.adapted = lora.has_lora(model)
        self.model = copy.deepcopy(model).eval().requires_grad_(False) if keep and not self.adapted else model

    @torch.no_grad()
    def __call__(self, x, y):
        if self.adapted:
            with lora.adapters_off(self.model):
                return sequence_logps(self.model, x, y)[0]
        return sequence_logps(self.model, x, y)[0]


@torch.no_grad()
def precompute(reference, pairs, batch_size, device, context):
    """Fill pairs.ref with the reference's log-probabilities of every pair (in `context`: the run's autocast)."""
    ref = torch.empty(len(pairs), 2)
    for i in range(0, len(pairs), batch_size):
        index = torch.arange(i, min(i + batch_size, len(pairs)))
        x, t = pairs.batch(index, device)
        with context():
            ref[index] = reference(x, t.y).float().cpu().view(2, -1).t()
    pairs.ref = ref


class Metrics:
    """Sums of the per-pair metrics (METRICS) since the last read, on the device (no host sync per step)."""

    def __init__(self, device):
        self.sums = torch.zeros(len(METRICS) + 1, device=device)  # the last: the number of pairs

    def add(self, losses, chosen_rewards, rejected_rewards, logps):
        chosen, rejected = logps.detach().chunk(2)
        margin = chosen_rewards - rejected_rewards
        rows = torch.stack([losses.detach(), margin, (margin > 0).float(), chosen_rewards, rejected_rewards, chosen,
                            rejected])  # [metrics, B]
        self.sums[:-1] += rows.float().sum(-1)
        self.sums[-1] += losses.shape[0]

    def read(self, reduce=None, prefix=""):
        """{name: mean per pair} since the last read (reduce: e.g. a sum over processes), then start again."""
        sums = reduce(self.sums.clone()) if reduce else self.sums
        means = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
        self.sums.zero_()
        return {prefix + name: v for name, v in zip(METRICS, means)}


class DPOLoss:
    """A training run's loss function for preference pairs (its interface: HeadLoss's): the mean DPO loss of a
    batch against its Targets under `model` (the policy); the batch's metrics are added to `metrics` (default:
    self.metrics)."""

    def __init__(self, model, reference, beta, label_smoothing=0.0, loss="sigmoid", device="cpu"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
        self.model, self.reference, self.beta = model, reference, beta
        self.label_smoothing, self.loss, self.metrics = label_smoothing, loss, Metrics(device)

    def __call__(self, net, x, targets, label_smoothing=None, reduction="mean", metrics=None):
        """The loss of net(x) (net: the model, or DDP / torch.compile around it)."""
        logps, counts = sequence_logps(self.model, x, targets.y, net)
        ref = targets.ref if targets.ref is not None else self.reference(x, targets.y)
        losses, chosen_rewards, rejected_rewards = dpo_loss(logps, ref, counts, self.beta, self.label_smoothing,
                                                            self.loss)
        (metrics or self.metrics).add(losses, chosen_rewards, rejected_rewards, logps)
        return losses.mean() if reduction == "mean" else losses.sum()


@torch.no_grad()
def evaluate(model, pairs, batch_size, device, index, loss_of, context):
    """The validation metrics ({"val_loss": ..., "val_reward_accuracy": ...}) over the pairs `index` names."""
    model.eval()
    metrics = Metrics(device)
    for i in range(0, len(index), batch_size):
        x, targets = pairs.batch(index[i:i + batch_size], device)
        with context():
            loss_of(model, x, targets, metrics=metrics)
    model.train()
    return metrics.read(prefix="val_")


def prepare(model, s, train, val, saved, init, context):
    """(the run's DPOLoss, its state for checkpoints) for `model`, as it starts training with settings `s`
    (beta, label_smoothing, dpo_loss, dpo_reference, batch_size, device). saved: the state a resumed run's
    checkpoint holds (else None); init: the source the run started from. A resumed run keeps its reference:
    the precomputed log-probabilities it saved, the adapters off, or (full fine-tuning) its init source
    loaded again. context: where forward passes run (the run's autocast)."""
    resumed, saved = saved is not None, saved or {"init": None if init is None else os.fspath(init)}
    if s.dpo_reference == "precomputed" and "ref" in saved:
        train.ref, val.ref = saved["ref"]
        return DPOLoss(model, None, s.beta, s.label_smoothing, s.dpo_loss, s.device), saved
    base = model
    if resumed and not lora.has_lora(model):  # resumed full fine-tuning: the weights it started from
        base = load_source(saved["init"])[0].to(s.device).eval()
    reference = Reference(base, keep=s.dpo_reference == "live" and base is model)
    if s.dpo_reference == "precomputed":
        for pairs in (train, val):
            precompute(reference, pairs, s.batch_size, s.device, context)
        saved, reference = {**saved, "ref": [train.ref, val.ref]}, None
    return DPOLoss(model, reference, s.beta, s.label_smoothing, s.dpo_loss, s.device), saved
