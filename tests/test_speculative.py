"""Speculative decoding: greedy output equal to plain greedy decoding token for token for every architecture
and every kind of draft (prompt lookup, a draft that mostly agrees, one that mostly does not, the model's own
int4 quantization), batched rows keeping different numbers of tokens; sampling that keeps the model's
distribution (a chi-square test that fails for a wrong rejection rule); the refused settings."""
import copy

import pytest
import torch

import zoo
from zoo import generation, speculative
from zoo.generation import complete, generate
from zoo.sampling import process_logits
from zoo.speculative import lookup

from conftest import TINY, tiny as tiny_model
from test_generate import UNTIED

GENERATORS = ["bigram", "scratchformer", "scratchformer-xglm", "gpt2", "llama-gqa", "mqa"]
PROMPTS = [[5, 9, 1, 30, 2, 7, 7, 5, 9], [3, 11, 4], [20, 1, 8, 36, 0, 20, 1]]  # repeats: lookup finds n-grams


def tiny(name, device="cpu", **overrides):
    """A TINY model whose greedy choices vary; block_size 40: the caches (prompt + 2 * 24 + k + 1 slots
    wanted) are cut to 40, so the holes fill them and they refill."""
    return tiny_model(name, device, std=0.5 if name != "bigram" else 2.0, **{"block_size": 40, **UNTIED.get(name, {}),
                                                                             **overrides})


def perturbed(model, noise, seed=1):
    """A copy of the model with noise on its weights: a draft that agrees with it often, not always."""
    draft = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn_like(p))
    return draft


def other(name, device="cpu"):
    """A model of another architecture with the same vocabulary: a draft that mostly disagrees."""
    return tiny("gpt2" if name != "gpt2" else "llama-gqa", device)


def check_greedy(model, draft, steps=24, **settings):
    stats = {}
    plain = generate(model, PROMPTS, steps, temperature=0, **settings)
    fast = generate(model, PROMPTS, steps, temperature=0, draft=draft, num_draft=4, stats=stats, **settings)
    assert fast == plain
    assert len({tuple(r) for r in plain}) > 1 and any(len(set(r)) > 2 for r in plain), "degenerate test"
    return stats


# ---------------------------------------------------------------------------------------------------------
# greedy: the same tokens as plain decoding


def test_the_prompt_is_prefilled_whole_as_in_plain_decoding():
    """The first new token comes from the prompt's own prefill, as plain decoding's (a check that fed the prompt's
    last token with the drafts would compute its keys by the decoding attention, not the prompt's: other bits)."""
    model, widths = tiny("llama-gqa"), []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(args[0].size(1)), with_kwargs=True)
    for draft in (None, "prompt-lookup", perturbed(model, 0.02)):
        widths.clear()
        generate(model, PROMPTS, 6, temperature=0, draft=draft)
        assert widths[0] == max(map(len, PROMPTS)) and len(widths) > 1


@pytest.mark.parametrize("name", GENERATORS)
def test_greedy_with_any_draft_equals_plain_greedy(name, device):
    model = tiny(name, device)
    lookup_stats = check_greedy(model, "prompt-lookup")
    # noise that leaves the draft agreeing mostly, not always (the bigram's weights have std 2, the others' 0.5)
    near = check_greedy(model, perturbed(model, 0.5 if name == "bigram" else 0.02))
    far = check_greedy(model, other(name, device))
    for stats in lookup_stats, near, far:
        assert stats["drafted"] > 0
    # rows kept drafts and lost drafts: the rollback was exercised, and the near draft mostly agrees
    assert 0 < near["accepted"] < near["drafted"] and near["accepted"] > far["accepted"]
    assert far["accepted"] < far["drafted"] / 2


@pytest.mark.parametrize("name", ["llama-qwen2-window", "gemma3"])
def test_drafts_on_a_sliding_window_model_equal_plain_greedy(name):
    """Rejected drafts leave holes in the cache rows; a window (4-5 tokens) counts real tokens only, so a
    windowed model decodes through the holes as plain greedy does."""
    model = tiny(name)
    for draft in ("prompt-lookup", perturbed(model, 0.15)):
        stats = check_greedy(model, draft)
        assert stats["accepted"] < stats["drafted"]  # some drafts were rejected: there were holes


def test_int4_self_draft_equals_plain_greedy():
    model = tiny("llama-gqa", n_head=4, n_embd=64, ffn_dim=64)  # int4 groups of 32 divide every layer's inputs
    generate(model, [1, 2], 2)  # a model that has generated has its float32 weights column-major
    draft = zoo.quantize(copy.deepcopy(model), "int4", dtype=torch.float32)
    stats = check_greedy(model, draft)
    assert 0 < stats["accepted"] < stats["drafted"]  # (a tiny random model has many near-ties that 4 bits flip)


@pytest.mark.parametrize("kind", ["float draft", "int4 self-draft", "longer draft cache"])
def test_a_compiled_draft_proposes_what_the_eager_one_does(kind, monkeypatch):
    """compile=True runs the draft model's one-token steps compiled: the text is plain greedy's, and the proposals
    are the eager draft's (the same counts of drafted and accepted tokens; float32 drafts, no near-ties), through the
    holes and refills of caches cut to block_size (40 slots), and with the draft's cache of 256 slots (the compiled
    step's) beside the model's shorter one (block_size 300)."""
    if kind == "int4 self-draft":
        model = tiny("llama-gqa", n_head=4, n_embd=64, ffn_dim=64)
        generate(model, [1, 2], 2)  # (its float32 weights column-major, as the draft's copy gets them)
        draft = zoo.quantize(copy.deepcopy(model), "int4", dtype=torch.float32)
    else:
        model = tiny("gpt2", block_size=300 if kind == "longer draft cache" else 40)
        draft = perturbed(model, 0.15)
    calls = []  # the compiled step's calls: the draft's one-token proposals went through it
    compiled_step = generation.compiled_step
    monkeypatch.setattr(generation, "compiled_step", lambda m: lambda *a: calls.append(a) or compiled_step(m)(*a))
    plain = generate(model, PROMPTS, 24, temperature=0)
    counts = []
    for compile in (False, True):
        stats = {}
        assert generate(model, PROMPTS, 24, temperature=0, draft=draft, num_draft=4, compile=compile,
                        stats=stats) == plain
        counts.append(stats)
    assert counts[1] == counts[0] and 0 < counts[0]["accepted"] < counts[0]["drafted"], counts
    assert len(calls) >= counts[1]["rounds"] and all(a[0].shape == (3, 1) for a in calls)
    lengths = {a[2].shape[1] for a in calls}  # the draft's cache (its key mask's slots)
    assert lengths == ({256} if kind == "longer draft cache" else {40}), lengths


def test_one_token_prompts_and_single_rows_and_short_runs():
    model = tiny("gpt2")
    for draft in ("prompt-lookup", perturbed(model, 0.15)):
        for prompts, steps in (([[4]], 10), ([[4], [7, 7, 7]], 10), ([PROMPTS[0]], 1), ([PROMPTS[0]], 2)):
            assert generate(model, prompts, steps, temperature=0, draft=draft, num_draft=3) == \
                generate(model, prompts, steps, temperature=0)
    # the cache at its longest: prompt + max_new_tokens == block_size
    prompt = list(range(10))
    assert generate(model, prompt, 30, temperature=0, draft="prompt-lookup") == generate(model, prompt, 30,
                                                                                         temperature=0)


def test_eos_min_new_tokens_and_repetition_penalty_as_plain():
    model = tiny("llama-gqa")
    draft = perturbed(model, 0.15)
    plain = generate(model, PROMPTS, 24, temperature=0)
    eos = plain[0][3]  # a token every row is likely to meet, at different steps
    for settings in (dict(eos_token_id=eos), dict(eos_token_id=eos, min_new_tokens=6),
                     dict(repetition_penalty=1.5), dict(repetition_penalty=0.7, eos_token_id=[eos, 2])):
        for d in ("prompt-lookup", draft):
            expected = generate(model, PROMPTS, 24, temperature=0, **settings)
            assert generate(model, PROMPTS, 24, temperature=0, draft=d, num_draft=4, **settings) == expected
    assert any(len(r) < 24 for r in generate(model, PROMPTS, 24, temperature=0, eos_token_id=eos))


def test_prompt_lookup_finds_the_latest_longest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3], 2) == [8, 5]  # "2 3" last seen before 8; "5 2 3" never
    assert lookup([1, 2, 3, 4, 7, 2, 3], 5) == [4, 7, 2, 3]  # "2 3" -> what followed, up to the end
    assert lookup([1, 2, 3], 4) == []
    assert lookup([5], 4) == []
    assert lookup([4, 4, 4], 3) == [4]  # "4 4" occurs at 0; the token after it
    assert lookup([7, 1, 9, 2, 3, 1], 3) == []  # only "1" occurred before: one token is too short a match
    assert lookup([7, 1, 9, 2, 3, 1], 3, min_ngram=1) == [9, 2, 3]


@pytest.mark.slow
def test_smollm2_with_prompt_lookup_and_its_int4_copy_writes_its_greedy_answer(smollm2_gguf, shared_data):
    """Real weights, where near-ties are real: checking k + 1 tokens in one forward picks the tokens that one at
    a time does (float32; a copy-editing prompt, so that lookup finds the passage)."""
    model, tok = zoo.load_source("smollm2-135m-instruct")
    passage = " ".join((shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").split()[100:200])
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Correct the spelling and grammar of "
                                              f"this passage, changing nothing else:\n\n{passage}"}],
                                             add_generation_prompt=True))
    plain = generate(model, ids, 48, temperature=0)
    for draft in ("prompt-lookup", zoo.quantize(copy.deepcopy(model), "int4")):
        stats = {}
        assert generate(model, ids, 48, temperature=0, draft=draft, stats=stats) == plain
        assert stats["accepted"] > 0


# ---------------------------------------------------------------------------------------------------------
# sampling: the model's distribution, whatever the draft


def chi_square_p(observed, expected):
    """Pearson's chi-square test: the chance of a statistic this large if `observed` counts follow `expected`."""
    stat = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2, dtype=torch.float64), stat / 2))


def bigram(rows):
    model = zoo.build("bigram", dict(vocab_size=rows.size(1)))
    model.table.weight.data.copy_(rows)
    return model


def sequence_counts(model, prompt, steps, n, **kwargs):
    """How often each sequence of `steps` new tokens comes out of n rows."""
    out = torch.tensor(generate(model, [prompt] * n, steps, **kwargs))
    V = model.config.vocab_size
    codes = sum(out[:, i] * V ** (steps - 1 - i) for i in range(steps))
    return torch.bincount(codes, minlength=V ** steps).double()


def sequence_probs(model, prompt, steps, **settings):
    """The exact probability of each sequence of `steps` new tokens under the processed distribution."""
    V = model.config.vocab_size
    step = process_logits(model.table.weight.detach().float(), **settings).softmax(-1)  # [V, V]: prev -> next
    probs = torch.ones(1, dtype=torch.float64)
    prev = torch.tensor([prompt[-1]])
    for _ in range(steps):
        probs = (probs[:, None] * step[prev].double()).reshape(-1)
        prev = torch.arange(V).repeat(len(probs) // V)
    return probs


SAMPLED = [(dict(temperature=1.0), "model"), (dict(temperature=0.7, top_k=3), "model"),
           (dict(temperature=1.0), "prompt-lookup")]


@pytest.mark.parametrize("settings, draft", SAMPLED)
def test_sampling_keeps_the_model_distribution(settings, draft, monkeypatch):
    torch.manual_seed(0)
    target, q = bigram(torch.randn(4, 4) * 1.5), bigram(torch.randn(4, 4) * 1.5)  # drafts often rejected
    prompt = [0, 1, 2, 3, 1, 0, 2, 2, 3, 0, 1, 2]  # lookup proposes every next token, for 3-grams ending "1 2"...
    d = q if draft == "model" else "prompt-lookup"
    probs = sequence_probs(target, prompt, 4, **settings)  # (the first token from the prefill, then two drafts)

    def p_value(**kwargs):
        stats = {}
        counts = sequence_counts(target, prompt, 4, 6000, draft=d, num_draft=2, seed=0, stats=stats, **settings,
                                 **kwargs)
        assert stats["drafted"] > 6000 and 0.2 < stats["accepted"] / stats["drafted"] < 0.9, stats
        keep = probs > 0  # tokens top-k removes never come
        assert counts[~keep].sum() == 0
        return chi_square_p(counts[keep], probs[keep] / probs[keep].sum() * counts.sum())

    assert p_value() > 1e-3
    # the test has the power to see a wrong rule: drawing from p (not max(0, p - q)) after a rejection
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    assert p_value() < 1e-6


def test_sampling_with_a_seed_is_reproducible():
    model = tiny("gpt2")
    draft = perturbed(model, 0.15)
    a = generate(model, PROMPTS, 12, temperature=0.8, seed=3, draft=draft)
    assert a == generate(model, PROMPTS, 12, temperature=0.8, seed=3, draft=draft)
    assert a != generate(model, PROMPTS, 12, temperature=0.8, seed=4, draft=draft)


# ---------------------------------------------------------------------------------------------------------
# text, and the refused settings


def test_complete_with_a_draft_streams_the_same_text(gpt2_bpe):
    tok = zoo.tokenizer("gpt2")
    model = zoo.build("gpt2", dict(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16))
    text = "the cat sat on the mat, the cat sat on the"
    plain = complete(model, tok, text, max_new_tokens=20, temperature=0)
    stats = {}
    pieces = list(complete(model, tok, text, max_new_tokens=20, temperature=0, draft="prompt-lookup", stream=True,
                           stats=stats))
    assert "".join(pieces) == plain and len(stats["token_s"]) == 20 and stats["drafted"] > 0


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(draft="lookup"), TypeError, "prompt-lookup"),
    (dict(draft=3), TypeError, "draft must be"),
    (dict(draft="prompt-lookup", num_draft=0), ValueError, "num_draft must be an int >= 1"),
    (dict(draft="prompt-lookup", num_draft=2.0), ValueError, "num_draft must be an int >= 1"),
    (dict(num_draft=3), ValueError, "give a draft too"),
    (dict(draft="prompt-lookup", num_beams=2), ValueError, "num_beams must be 1"),
    (dict(draft="prompt-lookup", compile=True), ValueError, "prompt lookup has none: drop compile"),
])
def test_refused_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        generate(tiny("gpt2"), [1, 2], 5, **kwargs)


def test_refused_drafts():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match=r"vocabulary \(38 tokens\) differs from the model's \(37\)"):
        generate(model, [1, 2], 5, draft=tiny("gpt2", vocab_size=38))
    with pytest.raises(ValueError, match="the draft is the model itself"):
        generate(model, [1, 2], 5, draft=model)
    with pytest.raises(ValueError, match=r"fit the context of 20 tokens \(the smaller of model and draft\)"):
        generate(model, [1, 2], 19, draft=tiny("llama-gqa", block_size=20))
    assert TINY["gpt2"][1]["vocab_size"] == 37
