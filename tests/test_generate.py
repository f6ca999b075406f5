"""Generation: each sampler against a distribution whose answer is known, beam search against exhaustive
enumeration, batched == alone == recompute for all five models, the sliding window, EOS rules, text
completion (stop strings, streaming, chat), and every refused setting."""
import copy
import itertools
import math
import types

import pytest
import torch

import zoo
from zoo.tokenizers import load_tokenizer
from zoo.generation import complete, generate, token_stream
from zoo.sampling import (GREEDY_BLOCK, NUCLEUS_CANDIDATES, SamplingConfig, greedy, penalize_repetition,
                          process_logits, sample)

from conftest import tiny as tiny_model

GENERATORS = ["bigram", "scratchformer", "scratchformer-xglm", "gpt2", "llama-gqa", "llama-qwen2-window", "mqa",
              "moe", "gemma3"]


def tiny(name, device="cpu", **overrides):
    """A TINY model whose greedy choices vary; block_size 16, so that the sliding window is exercised."""
    return tiny_model(name, device, std=0.5 if name != "bigram" else 2.0, **{"block_size": 16, **UNTIED.get(name, {}),
                                                                             **overrides})


# a tiny Gemma with its head tied to the embedding, which it scales by sqrt(n_embd), greedily repeats its last token
UNTIED = {"gemma3": {"tie_embeddings": False}}


def bigram(rows):
    """A bigram model with the given next-token logits: rows[prev] (one row for all when rows is 1-D)."""
    rows = torch.as_tensor(rows, dtype=torch.float32)
    if rows.dim() == 1:
        rows = rows.expand(len(rows), -1)
    model = zoo.build("bigram", dict(vocab_size=rows.size(1)))
    model.table.weight.data.copy_(rows)
    return model


def greedy_recompute(model, prompt, steps):
    """nanoGPT's sampler, greedy: the full forward over the last block_size tokens at every step."""
    idx = torch.tensor([prompt], device=next(model.parameters()).device)
    for _ in range(steps):
        logits = model(idx[:, -model.config.block_size:])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], 1)
    return idx[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------------------
# samplers


def kept(logits):
    return (torch.isfinite(logits)).nonzero()[:, -1].tolist()


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
    probs = torch.tensor([0.0625, 0.25, 0.125, 0.5, 0.0625])  # exact in binary: sorted 0.5, 0.25, 0.125, ...
    logits = probs.log()[None]
    assert kept(process_logits(logits, top_p=0.5)) == [3]
    assert kept(process_logits(logits, top_p=0.75)) == [1, 3]
    assert kept(process_logits(logits, top_p=0.76)) == [1, 2, 3]
    assert kept(process_logits(logits, top_p=0.1)) == [3]  # the most likely token always stays
    assert kept(process_logits(logits, top_p=1.0)) == [0, 1, 2, 3, 4]
    # the kept tokens keep their relative probabilities
    torch.testing.assert_close(process_logits(logits, top_p=0.76).softmax(-1)[0, [1, 2, 3]],
                               torch.tensor([2, 1, 4]) / 7)


def test_min_p_threshold_is_relative_to_the_top_token():
    logits = torch.tensor([[0.10, 0.50, 0.25, 0.15]]).log()
    assert kept(process_logits(logits, min_p=0.4)) == [1, 2]  # threshold 0.4 * 0.5 = 0.2
    assert kept(process_logits(logits, min_p=0.25)) == [1, 2, 3]  # threshold 0.125
    assert kept(process_logits(logits, min_p=1.0)) == [1]
    assert kept(process_logits(logits, min_p=0.0)) == [0, 1, 2, 3]


@pytest.mark.parametrize("V", [GREEDY_BLOCK * 48, GREEDY_BLOCK * 2, 1000, GREEDY_BLOCK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_max_first_of_equals_and_nans_included(V, dtype):
    """greedy's blocks give max's index: ties (within a block, across blocks, at a block's edges) pick the first, a NaN
    the first NaN, over any batch shape."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(2, 3, V, generator=g).to(dtype)
    logits[0, 0, [V - 1, 0]] = 9  # the first and last
    logits[0, 1, [V // 2 + 1, V // 2]] = 9  # neighbours
    logits[0, 2, [V - 2, V // 3]] = float("nan")
    logits[1, 0, :] = 0  # all equal
    logits[1, 1, [7, V - 7]] = float("inf")
    logits[1, 2] = logits[1, 2].flip(-1)
    want = logits.max(-1).indices
    assert torch.equal(greedy(logits), want) and want[0].tolist() == [0, V // 2, V // 3]
    assert torch.equal(greedy(logits[0, 1]), want[0, 1])


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 5.0, 2.0]])
    assert kept(process_logits(logits, top_k=1)) == [1, 3]
    assert kept(process_logits(logits, top_k=3)) == [1, 2, 3]
    assert kept(process_logits(logits, top_k=99)) == [0, 1, 2, 3, 4]


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    torch.testing.assert_close(process_logits(logits, temperature=0.5), (logits - 1.0) * 2)  # from a maximum of 0
    flat = process_logits(logits, temperature=1e4).softmax(-1)
    torch.testing.assert_close(flat, torch.full((1, 3), 1 / 3), atol=1e-3, rtol=0)
    for tiny in (1e-30, 1e-300):  # its limit, greedy; not inf - inf = NaN, nor a temperature rounded to 0
        assert process_logits(logits, temperature=tiny).softmax(-1).tolist() == [[1.0, 0.0, 0.0]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert penalize_repetition(logits, seen, 0.5).tolist() == [[4.0, -1.0, 2.0, -2.0]]  # < 1 encourages


def test_repetition_penalty_in_generation():
    # positive logits: token 0 wins until penalised, then 1, then 0 again (1.5 > 1.0)
    model = bigram([3.0, 2.0, 0.0, 0.0])
    assert generate(model, [0], 4, temperature=0) == [[0, 0, 0, 0]]
    assert generate(model, [0], 4, temperature=0, repetition_penalty=2.0) == [[1, 0, 0, 0]]
    # negative logits are multiplied: -1 * 2 = -2 falls below -1.5
    model = bigram([-1.0, -1.5, -3.0, -3.0])
    assert generate(model, [0], 3, temperature=0, repetition_penalty=2.0) == [[1, 0, 0]]
    assert generate(model, [[3], [0]], 3, temperature=0, repetition_penalty=2.0) == [[0, 1, 0], [1, 0, 0]]


def expected_distribution(logits, temperature, top_k, top_p, min_p):
    """The processing chain written out independently, in float64 on a plain list."""
    z = [x / temperature for x in logits]
    kth = sorted(z, reverse=True)[top_k - 1]
    z = [x if x >= kth else -math.inf for x in z]
    p = [math.exp(x) for x in z]
    p = [x / sum(p) for x in p]
    order, mass, keep = sorted(range(len(p)), key=lambda i: -p[i]), 0.0, set()
    for i in order:
        if mass >= top_p:
            break
        keep.add(i)
        mass += p[i]
    p = [x if i in keep else 0.0 for i, x in enumerate(p)]
    p = [x / sum(p) for x in p]
    p = [x if x >= min_p * max(p) else 0.0 for x in p]
    return [x / sum(p) for x in p]


def test_sampling_frequencies_match_the_processed_distribution():
    logits = [2.0, 1.5, 1.0, 0.8, 0.3, -0.5, -1.0, 0.0]
    settings = dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.1)
    expected = expected_distribution(logits, **settings)
    assert sum(x > 0 for x in expected) == 4  # each filter removes something here: -1.0, then more
    n = 20000
    model = bigram(logits)
    counts = torch.bincount(torch.tensor(generate(model, [[0]] * n, 1, seed=0, **settings)).flatten(),
                            minlength=len(logits)).tolist()
    assert all(c == 0 for c, e in zip(counts, expected) if e == 0), "a filtered token was sampled"
    chi2 = sum((c - n * e) ** 2 / (n * e) for c, e in zip(counts, expected) if e > 0)
    assert chi2 < 16.3, (counts, expected)  # the 0.999 quantile of chi-square with 3 degrees of freedom


def test_top_p_sorts_whole_rows_only_where_the_nucleus_needs_it():
    """On a CPU, top-p sorts the most likely 256 tokens of each row first, then 4096, then all (NUCLEUS_CANDIDATES):
    it keeps what sorting the whole row keeps, whichever of them holds the nucleus."""
    V = 6000
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    logits = logits * torch.tensor([[8.0], [4.0], [0.3], [6.0], [0.1], [2.0]])  # peaked rows and flat ones
    sizes = set()
    for top_p in (0.5, 0.9, 0.99):
        probs, order = logits.softmax(-1).sort(-1, descending=True)  # the whole vocabulary, written out
        mass_before = probs.cumsum(-1) - probs
        mass_before[:, 1:] = probs.cumsum(-1)[:, :-1]
        keep = (mass_before < top_p).scatter(-1, order, mass_before < top_p)
        got = process_logits(logits, top_p=top_p)
        assert torch.equal(got.isfinite(), keep) and torch.equal(got[keep], logits[keep])
        three = process_logits(logits.view(2, 3, V), top_p=top_p)  # as speculative decoding calls it
        assert torch.equal(three, got.view(2, 3, V))
        sizes |= {int(n) for n in keep.sum(-1)}
    assert NUCLEUS_CANDIDATES == (256, 4096)
    assert min(sizes) < 256 and any(256 < n < 4096 for n in sizes) and max(sizes) > 4096  # each stage holds some


def test_sample_draws_from_the_probabilities(device):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device)
    g = torch.Generator(device).manual_seed(0)
    draws = sample(probs.expand(40000, -1), g)
    freq = torch.bincount(draws, minlength=4) / 40000
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.bincount(sample(3 * probs.expand(40000, -1), g), minlength=4) / 40000, probs,
                               atol=0.01, rtol=0)  # weights need not sum to 1


def test_sample_never_draws_a_zero_probability_token(device, monkeypatch):
    V, n = 5000, 4000
    probs = torch.zeros(3, V, device=device)
    probs[0, [0, 7, 2500, 4998]] = torch.tensor([1e-6, 0.5, 0.3, 1e-6], device=device)  # few, some tiny, none last
    probs[1, -3:] = torch.tensor([0.2, 1e-7, 0.3], device=device)  # the mass at the end of the vocabulary
    probs[2, :3] = torch.tensor([0.0, 0.3, 0.7], device=device)  # at the start: zeros after it to the end
    draws = sample(probs.repeat(n, 1), torch.Generator(device).manual_seed(0)).view(n, 3)
    allowed = probs > 0
    for row in range(3):
        assert allowed[row, draws[:, row]].all(), f"row {row} drew a token of probability 0"
        assert draws[:, row].unique().numel() > 1
    if device.type == "cpu":  # the inverse-CDF sampler at the ends of its uniform: 0 and 1 (past the last value)
        monkeypatch.setattr(torch, "rand_like", lambda t, **_: torch.zeros_like(t))
        assert sample(probs).tolist() == [0, V - 3, 1]
        monkeypatch.setattr(torch, "rand_like", lambda t, **_: torch.ones_like(t))
        assert sample(probs).tolist() == [4998, V - 1, 2]


def test_sample_draws_each_row_on_its_own():
    """Rows sharing one generator draw independently: the same distribution in every row gives different tokens,
    and a row's draws follow its own distribution whatever the other rows hold."""
    g = torch.Generator().manual_seed(0)
    probs = torch.full((20000, 2), 0.5)
    probs[1::2] = torch.tensor([0.9, 0.1])
    draws = sample(probs, g)
    torch.testing.assert_close(draws[0::2].float().mean(), torch.tensor(0.5), atol=0.02, rtol=0)
    torch.testing.assert_close(draws[1::2].float().mean(), torch.tensor(0.1), atol=0.02, rtol=0)
    pairs = draws[0::2] * 2 + draws[1::2]  # even rows independent of the odd row after them
    torch.testing.assert_close(torch.bincount(pairs, minlength=4) / 10000,
                               torch.tensor([0.45, 0.05, 0.45, 0.05]), atol=0.015, rtol=0)


def test_seed_reproduces_the_sample():
    model = tiny("gpt2")
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 20, seed=7, top_p=0.95)
    assert a == generate(model, prompts, 20, seed=7, top_p=0.95)
    assert a != generate(model, prompts, 20, seed=8, top_p=0.95)
    torch.manual_seed(3)
    b = generate(model, prompts, 20)  # no seed: torch's global generator
    torch.manual_seed(3)
    assert b == generate(model, prompts, 20)


# ---------------------------------------------------------------------------------------------------------
# greedy decoding: batched == alone == full recomputation, sliding past block_size


@pytest.mark.parametrize("name", GENERATORS)
def test_batched_equals_alone_equals_recompute(name, device):
    model = tiny(name, device)
    prompts = [[5, 9, 1, 30, 2, 7, 7], [3, 11, 4], [20, 1, 8, 36, 0]]
    steps = 14  # 7 + 14 > block_size 16: the longest row slides its window, the others not at first
    batched = generate(model, prompts, steps, temperature=0)
    alone = [generate(model, p, steps, temperature=0)[0] for p in prompts]
    reference = [greedy_recompute(model, p, steps) for p in prompts]
    assert batched == alone == reference
    assert len({tuple(r) for r in reference}) > 1 and any(len(set(r)) > 2 for r in reference), "degenerate test"


@pytest.mark.slow
def test_compiled_decode_step_generates_the_same(device):
    model = tiny("llama-gqa", device, block_size=300)  # the cache rounds up to 256 slots: a second call reuses the code
    prompts = [[5, 9, 1, 30, 2, 7, 7], [3, 11, 4]]  # padded: the key mask goes through the compiled step too
    compiled = generate(model, prompts, 12, temperature=0, compile=True)
    assert compiled == generate(model, prompts, 12, temperature=0) == [greedy_recompute(model, p, 12) for p in prompts]
    assert generate(model, [[1, 2], [3]], 20, temperature=0, compile=True) == generate(model, [[1, 2], [3]], 20,
                                                                                       temperature=0)
    assert "_compiled_steps" in vars(model) and all("_compiled" not in k for k in model.state_dict())


@pytest.mark.slow
def test_compiled_step_compiles_anew_for_a_changed_model():
    """The compiled step skips dynamo's guards on the model's modules (see compiled_step): once the model is
    quantized in place, its step must be compiled anew, not the float model's run on the new modules."""
    model = tiny("llama-gqa", block_size=300)
    prompts = [[5, 9, 1, 30, 2, 7, 7], [3, 11, 4]]
    assert generate(model, prompts, 6, temperature=0, compile=True) == generate(model, prompts, 6, temperature=0)
    generate(model, prompts, 6, temperature=0, compile=True)  # the same model again: the same step (counted below)
    zoo.quantize(model, "int8")
    quantized = generate(model, prompts, 12, temperature=0)
    assert generate(model, prompts, 12, temperature=0, compile=True) == quantized
    assert len(model._compiled_steps) == 2


def test_a_copy_compiles_its_own_step():
    """copy.deepcopy copies the model's compiled steps, whose code calls the original: a copy (a draft, say) runs
    its own step, over its own weights and cache."""
    model = tiny("llama-gqa", block_size=300)
    prompts = [[5, 9, 1, 30, 2, 7, 7], [3, 11, 4]]
    generate(model, prompts, 6, temperature=0, compile=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(-1)
    assert generate(twin, prompts, 12, temperature=0, compile=True) == generate(twin, prompts, 12, temperature=0)
    assert generate(twin, [[1, 2]], 8, temperature=0, compile=True) != generate(model, [[1, 2]], 8, temperature=0)


def test_past_block_size_the_window_slides():
    model = tiny("gpt2", block_size=64, n_layer=1)
    prompt = list(range(10))
    out = generate(model, prompt, 300, temperature=0.9, seed=0)[0]
    assert len(out) == 300
    assert generate(model, prompt, 90, temperature=0)[0] == greedy_recompute(model, prompt, 90)


def test_model_still_trains_and_saves_after_generating(tmp_path):
    model = tiny("llama-gqa").train()
    idx = torch.tensor([[1, 2, 3]])
    before = model(idx)
    generate(model, [1, 2, 3], 5, temperature=0)
    assert model.training
    torch.testing.assert_close(model(idx), before, rtol=1e-4, atol=1e-4)  # only the weights' layout changed
    model(idx).sum().backward()  # the cache left behind does not get in the way of training
    assert model.lm_head.weight.grad is not None
    zoo.save_pretrained(model, tmp_path / "saved")
    torch.testing.assert_close(zoo.from_pretrained(tmp_path / "saved")(idx), before, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# EOS


def test_eos_ends_a_row_and_is_included():
    # from any token: 4 (EOS) is likeliest, then 1
    model = bigram([0.0, 2.0, 0.0, 0.0, 3.0])
    assert generate(model, [0], 5, temperature=0, eos_token_id=4) == [[4]]
    assert generate(model, [0], 5, temperature=0, eos_token_id=[2, 4], min_new_tokens=3) == [[1, 1, 1, 4]]
    assert generate(model, [0], 5, temperature=0) == [[4, 4, 4, 4, 4]]  # no EOS given: none
    # rows end independently; the batch stops when all have ended
    rows = torch.zeros(5, 5)
    rows[0, 1], rows[1, 2], rows[2, 4], rows[3, 3], rows[4, 4] = 5, 5, 5, 5, 5  # 0->1->2->4, 3->3->...
    assert generate(bigram(rows), [[0], [3]], 6, temperature=0, eos_token_id=4) == [[1, 2, 4], [3] * 6]


def test_model_eos_token_id_is_the_default():
    model = bigram([0.0, 2.0, 0.0, 0.0, 3.0])
    model.eos_token_id = 4
    assert generate(model, [0], 5, temperature=0) == [[4]]


# ---------------------------------------------------------------------------------------------------------
# beam search


def sequence_logprob(model, prompt, seq):
    idx = torch.tensor([prompt + seq])
    logp = model(idx)[0].log_softmax(-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_finds_the_best_sequence_by_enumeration(length_penalty):
    torch.manual_seed(1)
    model = zoo.build("gpt2", dict(vocab_size=4, block_size=16, n_layer=1, n_head=2, n_embd=8)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.7)
    prompt, eos, steps = [1, 2], 0, 3
    # every candidate: ended by EOS after 1..3 tokens, or 3 tokens without EOS
    candidates = [list(s) + [eos] for n in range(steps) for s in itertools.product([1, 2, 3], repeat=n)]
    candidates += [list(s) for s in itertools.product([1, 2, 3], repeat=steps)]
    assert len(candidates) == 40
    with torch.no_grad():
        scores = {tuple(c): sequence_logprob(model, prompt, c) / len(c) ** length_penalty for c in candidates}
    best = max(scores, key=scores.get)
    beams = generate(model, prompt, steps, num_beams=27, eos_token_id=eos, length_penalty=length_penalty)[0]
    assert tuple(beams) == best
    if length_penalty == 1.0:
        greedy = generate(model, prompt, steps, temperature=0, eos_token_id=eos)[0]
        assert scores[tuple(greedy)] <= scores[best]


def test_beam_search_beats_greedy_where_greedy_is_short_sighted():
    rows = torch.full((6, 6), -20.0)
    rows[0, 1], rows[0, 2] = math.log(0.5), math.log(0.4)  # greedy takes 1 ...
    rows[1, :] = math.log(1 / 6)  # ... after which everything is unlikely
    rows[2, 3] = math.log(0.99)  # 2 then 3 is the likeliest pair: 0.396 > 0.5 / 6
    model = bigram(rows)
    assert generate(model, [0], 2, temperature=0) == [[1, 0]]
    assert generate(model, [0], 2, num_beams=2) == [[2, 3]]


@pytest.mark.parametrize("name", ["llama-gqa", "llama-phi3-window"])  # the window (6) shorter than the beams
def test_beam_search_batched_equals_alone_and_one_beam_is_greedy(name):
    model = tiny(name)
    prompts = [[5, 9, 1, 30, 2], [3, 11], [20, 1, 8]]
    batched = generate(model, prompts, 8, num_beams=3, eos_token_id=[3, 17], length_penalty=0.5)
    assert batched == [generate(model, p, 8, num_beams=3, eos_token_id=[3, 17], length_penalty=0.5)[0]
                       for p in prompts]
    assert generate(model, prompts, 8, num_beams=1, temperature=0) == [
        greedy_recompute(model, p, 8) for p in prompts]


# ---------------------------------------------------------------------------------------------------------
# text: complete, stop strings, streaming


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_bpe):
    return load_tokenizer("gpt2")


class Scripted(torch.nn.Module):
    """A stand-in model that writes `script` greedily, whatever it is fed: at position p it predicts
    script[p - prompt_len + 1]. It records the prompt it was given."""

    def __init__(self, script, vocab_size, prompt_len):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=vocab_size, block_size=1024)
        self.script, self.prompt_len, self.prompt = script, prompt_len, None
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so that the model has a device

    def setup_cache(self, batch_size, max_len):
        pass

    def reorder_cache(self, index):
        pass

    def forward(self, idx, input_pos=None, key_mask=None, last_only=False):
        if self.prompt is None:
            self.prompt = idx[0].tolist()
        pos = input_pos if input_pos is not None else torch.arange(idx.size(1))
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for i, p in enumerate(pos.tolist()):
            k = p - self.prompt_len + 1
            logits[:, i, self.script[k] if 0 <= k < len(self.script) else 0] = 1.0
        return logits[:, -1:] if last_only else logits


def scripted(tok, prompt, text, end=()):
    return Scripted(tok.encode(text) + list(end), tok.vocab_size, len(tok.encode(prompt)))


TEXT = "Grüße 🙂 aus Köln! Ça va? 日本語 STOP here, then more."


def test_complete_returns_the_continuation_and_ends_at_eos(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = scripted(tok, "Hello", TEXT, end=[tok.eos_id])
    assert complete(model, tok, "Hello", max_new_tokens=100, temperature=0) == TEXT
    assert model.prompt == tok.encode("Hello")
    assert complete(scripted(tok, "Hello", TEXT), tok, "Hello", max_new_tokens=3, temperature=0) == \
        tok.decode(tok.encode(TEXT)[:3])


def test_stream_pieces_join_to_the_text_and_never_split_a_character(gpt2_tokenizer):
    tok = gpt2_tokenizer
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should have characters spread over tokens"
    pieces = list(complete(scripted(tok, "Hi", TEXT, [tok.eos_id]), tok, "Hi", max_new_tokens=100,
                           temperature=0, stream=True))
    assert "".join(pieces) == TEXT
    assert len(pieces) > 10 and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop,expected", [
    ("STOP", "Grüße 🙂 aus Köln! Ça va? 日本語 "),
    (["va?", "Köln"], "Grüße 🙂 aus "),  # the earliest of several stop strings
    ("🙂", "Grüße "),  # a stop string spread over several tokens
    ("n! Ça", "Grüße 🙂 aus Köl"),  # starting in the middle of a token
    ("not there", TEXT),
])
def test_stop_strings_cut_before_the_first_match(gpt2_tokenizer, stop, expected):
    tok = gpt2_tokenizer
    run = lambda stream: complete(scripted(tok, "Hi", TEXT, [tok.eos_id]), tok, "Hi", max_new_tokens=100,  # noqa
                                  stop=stop, temperature=0, stream=stream)
    assert run(False) == expected
    pieces = list(run(True))
    assert "".join(pieces) == expected
    stops = [stop] if isinstance(stop, str) else stop
    assert not any(s in p for p in pieces for s in stops)


def test_generation_stops_at_the_stop_string(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = scripted(tok, "Hi", TEXT)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    complete(model, tok, "Hi", max_new_tokens=100, stop="🙂", temperature=0)
    assert len(calls) < 10  # not all 100 tokens


def test_chat_messages_go_through_the_chat_template(gpt2_tokenizer):
    tok = gpt2_tokenizer
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        rendered = "<system>Be brief.\n<user>Hi!\n<assistant>"
        model = scripted(tok, rendered, "Hello.", [tok.eos_id])
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        assert complete(model, tok, messages, max_new_tokens=20, temperature=0) == "Hello."
        assert model.prompt == tok.encode(rendered)
    finally:
        tok.chat_template = None


def test_complete_with_beams_and_sampling(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = scripted(tok, "Hi", TEXT, [tok.eos_id])
    assert complete(model, tok, "Hi", max_new_tokens=100, num_beams=2, stop="STOP") == TEXT[:TEXT.index("STOP")]
    model = tiny("gpt2", vocab_size=tok.vocab_size, n_embd=16, n_head=2, n_layer=1, block_size=64)
    a = complete(model, tok, "Hi", max_new_tokens=8, seed=0, top_k=50)
    assert a == "".join(complete(model, tok, "Hi", max_new_tokens=8, seed=0, top_k=50, stream=True)) and a


# ---------------------------------------------------------------------------------------------------------
# refused settings


@pytest.mark.parametrize("settings,message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(num_beams=0), "num_beams"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(num_beams=2, top_k=5), "top_k"),
    (dict(num_beams=2, temperature=0.9), "temperature"),
    (dict(num_beams=2, seed=0), "seed"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("inf")), "top_p"),
    (dict(eos_token_id=-3), "eos_token_id"),
])
def test_impossible_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny("gpt2"), [1, 2], 5, **settings)
    with pytest.raises(ValueError, match=message):  # checked once, by the settings themselves
        SamplingConfig(**settings)


def test_sampling_config_and_keywords_are_one_way():
    model, prompts = tiny("gpt2"), [[1, 2, 3], [4, 5]]
    s = SamplingConfig(temperature=0.8, top_k=5, seed=3)
    assert generate(model, prompts, 6, s) == generate(model, prompts, 6, temperature=0.8, top_k=5, seed=3)
    assert generate(model, prompts, 6, s, top_k=2) == generate(model, prompts, 6, temperature=0.8, top_k=2, seed=3)
    assert generate(model, prompts, 6, s) != generate(model, prompts, 6, s, seed=4)  # the keyword wins
    with pytest.raises(TypeError, match="tempreature"):
        generate(model, prompts, 6, tempreature=0.5)
    with pytest.raises(TypeError, match="top_k must be an int"):
        SamplingConfig(top_k=2.5)


def test_bad_prompts_raise_value_error():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match=r"17 tokens.*block_size \(16\)"):
        generate(model, list(range(17)), 5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 5)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [1, 37], 5)


def test_token_stream_is_generates_loop_checked_on_the_call():
    """The public token stream (what the harness watches for stop strings) yields generate's tokens step by
    step, checks its arguments when called (not at the first step), and stops when closed."""
    model = tiny("gpt2")
    prompts = [[5, 17, 33], [2, 9]]
    steps = token_stream(model, prompts, 6, temperature=0)
    assert torch.stack(list(steps), 1).tolist() == generate(model, prompts, 6, temperature=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        token_stream(model, [[1], []], 5)
    with pytest.raises(ValueError, match="num_beams must be 1"):
        token_stream(model, prompts, 5, num_beams=2)
    steps = token_stream(model, prompts, 6, temperature=0)
    first = next(steps)
    steps.close()
    assert first.shape == (2,) and list(steps) == []
    model.train()
    list(token_stream(model, prompts, 2))
    assert all(m.training for m in model.modules())  # and gives a training model back in training mode


def test_flat_list_is_one_prompt_and_zero_tokens_is_empty():
    model = tiny("gpt2")
    assert generate(model, [1, 2, 3], 4, temperature=0) == generate(model, [[1, 2, 3]], 4, temperature=0)
    assert len(generate(model, [1, 2, 3], 4, temperature=0)) == 1
    assert generate(model, [[1], [2]], 0) == [[], []]


@pytest.mark.parametrize("name", ["gpt2", "llama-qwen2-window"])
def test_the_token_buffer_grows_as_generation_goes(name, monkeypatch):
    """The batch's token buffer starts with room for GROW_TOKENS new tokens and doubles: the same tokens as
    with room for all (padded rows, past block_size), and a max_new_tokens of 10**12 reserves nothing up front
    (it tried to allocate 8 TB) when an end token stops the rows."""
    from zoo import generation
    model = tiny(name)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    want = generate(model, prompts, 40, temperature=0)  # (past the tiny models' block_size of 16)
    beams = generate(model, prompts, 40, num_beams=2, temperature=0)
    monkeypatch.setattr(generation, "GROW_TOKENS", 3)
    assert generate(model, prompts, 40, temperature=0) == want
    assert generate(model, prompts, 40, num_beams=2, temperature=0) == beams  # (reordered rows, grown)
    first = want[0][0]
    assert generate(model, [prompts[0]], 10 ** 12, temperature=0, eos_token_id=first) == [[first]]


def test_numpy_and_torch_numbers_are_taken_as_python_ones():
    """A 1-D numpy prompt, numpy ids and settings, a tensor of end ids: as the Python values (they were refused
    as not token ids, or raised TypeErrors naming no setting)."""
    np = pytest.importorskip("numpy")
    model = tiny("llama-gqa")
    want = generate(model, [[1, 2, 3]], 6, temperature=0.7, top_k=5, seed=3, eos_token_id=[4])
    assert generate(model, np.array([1, 2, 3]), 6, temperature=np.float32(0.7), top_k=np.int64(5),
                    seed=np.int64(3), eos_token_id=torch.tensor([4])) == want
    assert SamplingConfig(eos_token_id=np.int64(4)).eos_ids == [4]
    assert SamplingConfig(eos_token_id=torch.tensor(4)).eos_ids == [4]
    assert hash(SamplingConfig(eos_token_id=[4, 5])) == hash(SamplingConfig(eos_token_id=(4, 5)))  # (hashable)
    with pytest.raises(ValueError, match="eos_token_id must be"):
        SamplingConfig(eos_token_id="4")
