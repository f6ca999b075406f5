"""A bigram language model: the next token's logits are a row of a vocab x vocab table.

The simplest model that learns anything: p(x_t | x_<t) = softmax(table[x_{t-1}]). Trained to
convergence it reaches exactly the conditional entropy of the text's bigram counts. One file,
torch only; it keeps the zoo's model contract (the cache methods have nothing to cache).

    model = Model(Config(vocab_size=65))
    logits = model(idx)                             # [B, T] -> [B, T, vocab_size]
"""
from dataclasses import dataclass

import torch.nn as nn


@dataclass
class Config:
    vocab_size: int = 65
    block_size: int = 256  # the model needs one token of context; this is only the training window

    def __post_init__(self):
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")


class Model(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)  # table[prev] = next logits
        nn.init.zeros_(self.table.weight)  # start from the uniform distribution

    def setup_cache(self, batch_size, max_len):
        """Nothing to cache: each prediction reads only the current token."""

    def reorder_cache(self, index):
        """Nothing to reorder."""

    def forward(self, idx, input_pos=None, key_mask=None, last_only=False):
        """idx [B, T] -> logits [B, T, vocab_size] ([B, 1, vocab_size] with last_only); input_pos and
        key_mask change nothing here."""
        return self.table(idx[:, -1:] if last_only else idx)
