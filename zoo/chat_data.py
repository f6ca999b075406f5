"""Conversations for supervised fine-tuning, with the loss on the assistant's tokens only.

Data: JSONL files (or hf: datasets with these columns) of

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": "2 + 2 =", "completion": " 4"}

the formats of TRL and of hosted fine-tuning APIs. Messages are rendered with the tokenizer's chat
template; every assistant turn is trained on, from its first token to its end-of-turn token (ChatML's
<|im_end|>) inclusive, and nothing else: not the system or user turns, not the template's markup before
the reply, not what follows the end-of-turn token. A prompt/completion pair of strings is plain text, as in
TRL (no template): prompt + completion + end of text, trained on the completion and the end of text; a
pair of message lists is one conversation.

Each example is its own row, right-padded to the longest in its batch (padding comes after the real
tokens, so under causal attention it changes none of them; its targets are ignored). Examples longer
than block_size + 1 tokens are cut, with a warning giving their count.

    train, val = load_splits(["chat.jsonl"], tokenizer, block_size=512)   # val: the last 10% of examples
    x, y = train.batch(train.draw(generator, (8,)))        # y: next tokens, data.IGNORE off the assistant's
"""
import json
import os

import numpy as np
import torch

from .data import HF_PREFIX, IGNORE, VAL_FRACTION, hf_rows, not_utf8
from .progress import log


def _example_kind(row):
    if isinstance(row, dict) and "messages" in row:
        return "messages"
    if isinstance(row, dict) and "prompt" in row and "completion" in row:
        return "prompt/completion"
    return None


def is_chat(paths):
    """Whether the data sources hold conversations (their first rows have "messages", or "prompt" and
    "completion") rather than text. Sources of both kinds together are an error."""
    kinds = {}
    for path in paths:
        if path.startswith(HF_PREFIX):
            columns = set(hf_rows(path).column_names)
            kinds[path] = "messages" in columns or {"prompt", "completion"} <= columns
            continue
        first = None
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    first = next((line for line in f if line.strip()), None)
            except UnicodeDecodeError:
                raise not_utf8(path) from None
        try:
            kinds[path] = first is not None and _example_kind(json.loads(first)) is not None
        except ValueError:
            kinds[path] = False
    if len(set(kinds.values())) > 1:
        chat = [p for p, k in kinds.items() if k]
        text = [p for p, k in kinds.items() if not k]
        raise ValueError(f"the data mixes conversations ({', '.join(chat)}) and text ({', '.join(text)}); "
                         "train on one kind at a time")
    return any(kinds.values())


def read_examples(paths):
    """Every example of the sources, as dicts with "messages" or "prompt" and "completion"."""
    examples = read_rows(paths)
    for where, row in examples:
        if _example_kind(row) is None:
            raise ValueError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": "
                             f"...}}, got keys {sorted(row) if isinstance(row, dict) else type(row).__name__}")
    return examples


def read_rows(paths):
    """[(where, row)]: every JSON row of the JSONL files and hf: datasets in `paths`, with its place ("file:line",
    "hf:... row i") for error messages."""
    examples = []
    for path in paths:
        if path.startswith(HF_PREFIX):
            rows, where = list(hf_rows(path)), lambda i, path=path: f"{path} row {i}"
        else:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data file {path!r} does not exist")
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append((n, json.loads(line)))
                        except ValueError as e:
                            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            lines = [n for n, _ in rows]
            rows, where = [r for _, r in rows], lambda i, path=path, lines=lines: f"{path}:{lines[i]}"
        examples += [(where(i), row) for i, row in enumerate(rows)]
    return examples


def encode(example, tokenizer):
    """(ids, trained) for one example: its token ids and, for each, whether the loss counts it."""
    if "messages" in example:
        return encode_messages(example["messages"], tokenizer)
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
        return encode_messages(prompt + completion, tokenizer)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("prompt and completion must both be strings (plain text) or both lists of messages")
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    first, rest = tokenizer.encode(prompt), _encode_more(tokenizer, completion) + eos
    return first + rest, [False] * len(first) + [True] * len(rest)


def _encode_more(tokenizer, text):
    """Ids of text that continues a sequence: without the BOS that encode() may put first."""
    ids = tokenizer.encode(text)
    return ids[1:] if tokenizer.add_bos and ids[:1] == [tokenizer.bos_id] else ids


def encode_messages(messages, tokenizer):
    """(ids, trained) of a conversation rendered with the tokenizer's chat template; trained marks every
    assistant turn's tokens through its end-of-turn token.

    Each assistant turn's span is found by rendering prefixes: the conversation up to the turn with the
    generation prompt (what the model sees before it replies) and up to the turn's end. Both must be
    prefixes of the whole rendering; the text is then tokenized piece by piece at those boundaries, so
    the prompt's tokens are exactly those a reply is generated after."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError("messages must be a list of {\"role\": ..., \"content\": ...}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message to train on")
    render = tokenizer.apply_chat_template
    full = render(messages, add_generation_prompt=False)
    cuts = [0]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], add_generation_prompt=True), render(messages[:i + 1],
                                                                                add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto) and before.startswith(full[:cuts[-1]])):
            if all(m["role"] == "system" for m in messages[:i]):  # the data, not the template
                raise ValueError(f"the conversation opens with the assistant (message {i}): nothing prompts its "
                                 "reply, so it cannot be told apart from what the template adds; begin with a user "
                                 "message")
            raise ValueError("the chat template does not render conversations prefix by prefix (message "
                             f"{i}'s text changes with what follows it), so the assistant's tokens cannot be told "
                             "apart; use a template that does, or prompt/completion examples")
        cuts += [len(before), len(upto)]
    cuts.append(len(full))
    ids, trained = [], []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if a == b:
            continue
        piece = tokenizer.encode(full[a:b]) if not ids else _encode_more(tokenizer, full[a:b])
        mark = [k % 2 == 1] * len(piece)  # pieces alternate: not trained, an assistant turn, not, ...
        if mark and mark[0]:
            ends = [j for j, t in enumerate(piece) if t in tokenizer.eos_ids]
            if ends:  # the turn ends at its end-of-turn token; the template's newline after it is not the reply
                mark = [j <= ends[-1] for j in range(len(piece))]
        ids += piece
        trained += mark
    return ids, trained


class Conversations:
    """Examples as rows: x = ids[:-1], y = ids[1:] with IGNORE where the target is not trained on, right-
    padded to the batch's longest. The interface of data.Windows: draw, fixed, batch."""

    def __init__(self, examples, pad_id):
        self.examples, self.pad_id = examples, pad_id  # [(ids int64 array, trained bool array)]

    def __len__(self):
        return len(self.examples)

    def draw(self, generator, shape):
        return torch.randint(len(self), shape, generator=generator)

    def fixed(self, n):
        """n example indices spread evenly (every example when there are fewer): the same each time."""
        return torch.linspace(0, len(self) - 1, min(n, len(self))).round().long().unique()

    def batch(self, index, device="cpu"):
        rows = [self.examples[i] for i in index.tolist()]
        T = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for b, (ids, trained) in enumerate(rows):
            t = torch.from_numpy(ids)
            x[b, :len(ids) - 1] = t[:-1]
            y[b, :len(ids) - 1] = t[1:].masked_fill(torch.from_numpy(~trained[1:]), IGNORE)
        return x.to(device), y.to(device)


def tokenize(examples, tokenizer, block_size, vocab_size=None):
    """Encoded examples cut to block_size + 1 tokens (a warning counts the cut ones; those left with no
    trained target are dropped, and counted too)."""
    out, cut, dropped = [], 0, 0
    for where, example in examples:
        try:
            ids, trained = encode(example, tokenizer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if len(ids) > block_size + 1:
            cut += 1
            ids, trained = ids[:block_size + 1], trained[:block_size + 1]
        if not any(trained[1:]):
            dropped += 1
            continue
        out.append((np.array(ids, dtype=np.int64), np.array(trained, dtype=bool)))
    if cut:
        log.warning("zoo: %d of %d examples are longer than block_size + 1 = %d tokens and were cut to it%s",
                    cut, len(examples), block_size + 1,
                    f"; {dropped} of them kept no assistant token and were left out" if dropped else "")
    if vocab_size is not None and out and max(int(ids.max()) for ids, _ in out) >= vocab_size:
        raise ValueError(f"the tokenizer's ids reach beyond the model's vocab_size {vocab_size}; is it the model's "
                         "own tokenizer?")
    return out


def load_splits(paths, tokenizer, val_paths=None, block_size=1024, vocab_size=None):
    """(train, val) Conversations; validation is the last VAL_FRACTION of the examples (at least one)
    unless val_paths are given."""
    examples = [read_examples(paths), read_examples(val_paths) if val_paths else None]
    if tokenizer.chat_template is None and any("messages" in e or isinstance(e["prompt"], list)
                                               for part in examples if part for _, e in part):
        raise ValueError("the tokenizer has no chat template to render conversations with; use a chat model's "
                         "tokenizer (--tokenizer) or prompt/completion examples")
    pad = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    train, val = split(examples, lambda part: tokenize(part, tokenizer, block_size, vocab_size), "examples")
    return Conversations(train, pad), Conversations(val, pad)


def split(parts, tokenize, what):
    """(train, val) tokenized from parts = [training rows, validation rows or None]; without validation rows,
    the last VAL_FRACTION of the training rows (at least one). Either split empty is an error naming it."""
    train = tokenize(parts[0])
    if parts[1] is not None:
        val = tokenize(parts[1])
    else:
        n = len(train) - max(1, int(len(train) * VAL_FRACTION))
        train, val = train[:n], train[n:]
    for name, part in (("training", train), ("validation", val)):
        if not part:
            raise ValueError(f"the {name} split has no {what}; give more {what} (or --val files)")
    return train, val


@torch.no_grad()
def assistant_loss(model, tokenizer, paths, block_size, batch_size=4, device="cpu", split="all"):
    """Mean loss per assistant token of the conversations in `paths` (split "val": their last VAL_FRACTION,
    the examples a training run validated on)."""
    examples = tokenize(read_examples(paths), tokenizer, block_size, model.config.vocab_size)
    if split == "val":
        examples = examples[len(examples) - max(1, int(len(examples) * VAL_FRACTION)):]
    rows = Conversations(examples, next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None))
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = rows.batch(torch.arange(i, min(i + batch_size, len(rows))), device)
        logits = model(x)
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                                   reduction="sum").item()
        count += int((y != IGNORE).sum())
    return total / count
