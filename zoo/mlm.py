"""Masked language modelling (Devlin et al., 2019, "BERT"): its examples, its evaluation, and fill_mask.

    zoo train shakespeare-char --data input.txt --objective mlm --out out/   # bidirectional attention
    zoo eval out/step-0005000 --data input.txt --objective mlm             # masked loss and accuracy
    zoo.fill_mask(model, tokenizer, "To be, or not to <|mask|>e")          # [[("b", 0.97), ...]]

BERT's recipe: `mask_prob` (15%) of a window's tokens are selected for prediction; of those, 80% become the
mask token, 10% a random token and 10% stay as they are, and the loss is the cross-entropy at the selected
positions only (every other target is data.IGNORE). The prediction for position i is the model's output at
position i itself (not i + 1 as in next-token training). A bidirectional model (causal=False) reads the
context on both sides; with causal=True the same objective trains the decoder-style variant, which sees
only the left context.
"""
import torch
from torch import nn

from . import data
from .modes import eval_mode
from .progress import log
from .registry import arch_of
from .tokenizers import MASK_TOKEN

MASK_PROB = 0.15  # BERT's share of selected tokens
MASKED, RANDOM = 0.8, 0.1  # of the selected tokens: replaced by the mask token, by a random token (the rest stay)
SEED_RANGE = 2 ** 62  # per-example mask seeds are drawn below this

# Where each model file keeps its token embedding (the output head is `lm_head` in all of them), and the
# standard deviation its own init draws the rows from, used for rows added to a vocabulary.
TOKEN_EMBEDDING = {"gpt2": ("transformer.wte", lambda c: 0.02), "mqa": ("transformer.wte", lambda c: 0.02),
                   "llama": ("model.embed_tokens", lambda c: 0.02), "gemma": ("model.embed_tokens", lambda c: 0.02),
                   "scratchformer": ("model.embed_tokens", lambda c: c.n_embd ** -0.5)}
TRANSFORMERS = tuple(TOKEN_EMBEDDING)  # the model files with attention, whose Config has `causal`


# ---------------------------------------------------------------------------------------- the model

def check_model(model, objective):
    """Refuse a model the objective cannot train: MLM needs attention (the bigram has none), and the causal
    objective a causal model (a bidirectional one sees the very token it must predict)."""
    causal = getattr(model.config, "causal", None)
    if objective == "mlm" and causal is None:
        raise ValueError(f"objective mlm needs a model with attention (gpt2, llama, mqa, scratchformer); "
                         f"{arch_of(model)} has none")
    if objective == "causal" and causal is False:
        raise ValueError("this model is bidirectional (causal=False): next-token training would let every "
                         "position see the token it must predict. Train it with objective mlm, or make it "
                         "causal (--set causal=true)")


def resize_vocab(model, vocab_size):
    """Grow the token embedding and the output head (tied or not) of a transformer in the zoo to
    `vocab_size` rows. The old rows are kept, the new ones drawn as the model file's own init draws them;
    config.vocab_size follows. Before an optimizer is made: the parameters are new objects."""
    arch = arch_of(model)
    if arch not in TOKEN_EMBEDDING:
        raise ValueError(f"resize_vocab: {arch} models are not supported (only {', '.join(TOKEN_EMBEDDING)})")
    path, std = TOKEN_EMBEDDING[arch]
    embedding, head = model.get_submodule(path), model.lm_head
    old = embedding.weight.shape[0]
    if vocab_size < old:
        raise ValueError(f"resize_vocab only grows a vocabulary: {vocab_size} < the model's {old}")
    tied = head.weight is embedding.weight

    def grown(weight):
        new = torch.empty(vocab_size - old, weight.shape[1], dtype=weight.dtype, device=weight.device)
        nn.init.normal_(new, mean=0.0, std=std(model.config))
        return nn.Parameter(torch.cat([weight.detach(), new]), requires_grad=weight.requires_grad)

    embedding.weight, embedding.num_embeddings = grown(embedding.weight), vocab_size
    head.weight, head.out_features = embedding.weight if tied else grown(head.weight), vocab_size
    model.config.vocab_size = vocab_size
    return model


def add_mask_token(model, tokenizer, mask_token=None):
    """Give `tokenizer` a mask token unless it has one (tokenizers.MASK_TOKEN by default), and grow `model`'s
    embedding and head when the new id lies past its rows. Notes what changed on the "zoo" logger."""
    if tokenizer.mask_token_id is not None:
        return model
    rows = model.config.vocab_size
    tokenizer.add_special_tokens(mask_token=mask_token or MASK_TOKEN)
    log.info("zoo: added the mask token %r to the tokenizer (id %d)", tokenizer.mask_token, tokenizer.mask_token_id)
    if tokenizer.vocab_size > rows and tokenizer.mask_token_id >= rows:
        resize_vocab(model, tokenizer.vocab_size)
        log.info("zoo: the model's token embedding and output head grew from %d to %d rows (new rows drawn as "
                 "the model's init draws them)", rows, tokenizer.vocab_size)
    return model


# ---------------------------------------------------------------------------------------- the examples

class MaskedWindows:
    """data.Windows with BERT's masking: x = the window with its selected tokens masked (not shifted),
    y = the original token at the selected positions and data.IGNORE elsewhere.

    An example's index is a pair (window start, mask seed): draw() takes both from the run's generator
    (checkpointed, so a resumed run masks exactly as an uninterrupted one; under DDP every rank draws the
    same global batch and masks only its own rows), and fixed() pairs evenly spread windows with seeds from
    `seed`, so evaluations see the same masks every time. An example's mask depends on its seed alone.
    """

    def __init__(self, windows, tokenizer, mask_prob=MASK_PROB, seed=0):
        if tokenizer.mask_token_id is None:
            raise ValueError("masked language modelling needs a tokenizer with a mask token; add one with "
                             "tokenizer.add_special_tokens(mask_token=...)")
        if not 0 < mask_prob <= 1:
            raise ValueError(f"mask_prob must be in (0, 1], not {mask_prob}")
        self.windows, self.mask_prob, self.seed = windows, mask_prob, seed
        self.mask_id = tokenizer.mask_token_id
        special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_token_id,
                   *tokenizer.eos_ids} - {None}
        # document separators and other special tokens are never selected, nor drawn as random replacements
        self.maskable = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
        self.maskable[sorted(special)] = False
        self.replacements = self.maskable.nonzero().squeeze(1)

    def __len__(self):
        return len(self.windows)

    def draw(self, generator, shape):
        starts = self.windows.draw(generator, shape)
        return torch.stack([starts, torch.randint(SEED_RANGE, shape, generator=generator)], -1)  # [*shape, 2]

    def fixed(self, n):
        return self.at(self.windows.fixed(n))

    def at(self, starts):
        """Indices of the windows at `starts` with masks seeded from self.seed: the same masks every time."""
        seeds = torch.randint(SEED_RANGE, (len(starts),), generator=torch.Generator().manual_seed(self.seed))
        return torch.stack([starts, seeds], -1)

    def batch(self, index, device="cpu"):
        """x, y [len(index), block_size] for an index [B, 2] of (window start, mask seed) pairs. Like BERT's
        create_pretraining_data, exactly round(mask_prob * n) of a window's n maskable tokens are selected
        (at least one, so no example is without a target)."""
        x, _ = self.windows.batch(index[:, 0], "cpu")  # [B, T]
        # per example, from its own seed: a selection score, an action and a replacement draw per position
        u = torch.stack([torch.rand(3, x.shape[1], generator=torch.Generator().manual_seed(int(seed)))
                         for seed in index[:, 1]])  # [B, 3, T]
        maskable = self.maskable[x]  # [B, T]
        n = maskable.sum(1)
        k = torch.minimum(n, (n * self.mask_prob).round().long().clamp(min=1))  # [B]
        rank = u[:, 0].masked_fill(~maskable, 2.0).argsort(1).argsort(1)  # the maskable ones first, at random
        selected = rank < k[:, None]  # [B, T]
        action = u[:, 1]
        random = self.replacements[(u[:, 2] * len(self.replacements)).long().clamp(max=len(self.replacements) - 1)]
        y = torch.where(selected, x, data.IGNORE)
        x = torch.where(selected & (action < MASKED), self.mask_id, x)
        x = torch.where(selected & (action >= MASKED) & (action < MASKED + RANDOM), random, x)
        return x.to(device), y.to(device)


# ---------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def masked_evaluation(model, tokenizer, tokens, window, batch_size=4, device="cpu", mask_prob=MASK_PROB, seed=0):
    """(loss, accuracy) at the masked positions of `tokens` (1-d), read in consecutive windows of `window`
    tokens (a last partial window is left out), masked with seed `seed`: the same masks every time.
    loss: mean cross-entropy (nats) per selected token; accuracy: the share whose top prediction is right."""
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token: masked evaluation needs a model trained with the MLM "
                         "objective (zoo train --objective mlm), whose checkpoint saves its tokenizer with one")
    if window > model.config.block_size:
        raise ValueError(f"window {window} exceeds the model's block_size {model.config.block_size}")
    if len(tokens) <= window:
        raise ValueError(f"the text has {len(tokens)} tokens; masked evaluation needs more than the window "
                         f"({window}); pass a smaller --window or more text")
    examples = MaskedWindows(data.Windows(tokens, window), tokenizer, mask_prob, seed)
    index = examples.at(torch.arange(0, len(tokens) - window, window))
    total, correct, count = torch.zeros((), dtype=torch.float64), 0, 0
    with eval_mode(model):
        for i in range(0, len(index), batch_size):
            x, y = examples.batch(index[i:i + batch_size], device)
            logits = model(x).float()[y != data.IGNORE]  # [selected, vocab]
            targets = y[y != data.IGNORE]
            total += nn.functional.cross_entropy(logits, targets, reduction="sum").double().cpu()
            correct += (logits.argmax(-1) == targets).sum().item()
            count += len(targets)
    return (total / count).item(), correct / count


# ---------------------------------------------------------------------------------------- fill_mask

@torch.no_grad()
def fill_mask(model, tokenizer, text, top_k=5):
    """For each mask token in `text`, in order: a list of (token text, probability) pairs, the top_k most
    probable tokens at that position, most probable first. One forward pass over the whole text: each
    prediction sees every other token, the other masks included (as masks)."""
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token: fill_mask needs a model trained with the MLM "
                         "objective (zoo train --objective mlm), whose checkpoint saves its tokenizer with one")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, not {top_k!r}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str (with {tokenizer.mask_token!r} where a token is to be predicted), not "
                        f"{type(text).__name__}")
    ids = tokenizer.encode(text)
    where = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
    if not where:
        raise ValueError(f"the text has no mask token: write {tokenizer.mask_token!r} where a token is to be "
                         "predicted")
    if len(ids) > model.config.block_size:
        raise ValueError(f"the text is {len(ids)} tokens long, more than the model's block_size "
                         f"{model.config.block_size}")
    device = next(model.parameters()).device
    with eval_mode(model):
        logits = model(torch.tensor([ids], device=device))[0, where].float()  # [masks, model's vocab_size]
    # over the tokens the tokenizer can write, the mask itself aside: never a training target, and no fill
    logits[:, tokenizer.mask_token_id] = float("-inf")
    probs = logits[:, :tokenizer.vocab_size].softmax(-1)
    p, top = probs.topk(min(top_k, probs.shape[-1] - 1), dim=-1)
    return [[(tokenizer.decode([t]), prob) for t, prob in zip(row_ids, row_p)]
            for row_ids, row_p in zip(top.tolist(), p.tolist())]
