"""The continuous-batching engine (zoo/engine.py) on small random models of every architecture: requests that
join a running batch at different steps, past the cache's first length (packing and growing it), decode
exactly as each would alone; sampling with a seed, end tokens and stop strings as zoo.generate/complete;
cancelling frees the row; a full queue and impossible requests are refused."""
import pytest
import torch

from test_generate import GENERATORS, tiny
from zoo.engine import Engine, QueueFull, RequestError
from zoo.generation import complete, generate
from zoo.sampling import SamplingConfig
from zoo.tokenizers import CharTokenizer

GREEDY = SamplingConfig(temperature=0, eos_token_id=[])  # no end token: each row runs to max_tokens
PROMPTS = [[5, 9, 1, 30, 2, 7, 7], [3, 11, 4], [20, 1, 8, 36, 0], [1] * 20, [2], [4, 5, 6, 7, 8, 9, 10, 11, 12]]
STEPS = [14, 20, 5, 25, 30, 12]


@pytest.fixture(scope="module")
def chars():
    return CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,!?ABCDEF")  # 37 characters: the tiny vocab


def run(engine):
    while engine.step():
        pass


@pytest.mark.parametrize("name", GENERATORS)
def test_requests_joining_a_running_batch_decode_as_alone(name, device, chars):
    model = tiny(name, device, block_size=48)
    alone = [generate(model, p, n, GREEDY)[0] for p, n in zip(PROMPTS, STEPS)]
    engine = Engine(model, chars, max_batch=3, max_queue=10, cache_len=8)
    packs, pack = [], engine.cache._pack
    engine.cache._pack = lambda: (packs.append(engine.cache.t), pack())
    requests = [engine.submit(PROMPTS[0], STEPS[0], GREEDY)]
    engine.step(), engine.step()
    requests.append(engine.submit(PROMPTS[1], STEPS[1], GREEDY))  # joins at step 3
    engine.step()
    # the rest wait for rows; [1] * 20 is longer than the frontier when it joins (a jump, holes in others)
    requests += [engine.submit(p, n, GREEDY) for p, n in zip(PROMPTS[2:], STEPS[2:])]
    run(engine)
    assert [r.tokens for r in requests] == alone
    assert [r.finish_reason for r in requests] == ["length"] * len(PROMPTS)
    assert engine.running == 0 and engine.queued == 0
    assert packs and engine.cache.length > 8, "the cache was neither packed nor grown: the test misses its point"
    assert len({tuple(a) for a in alone}) == len(alone), "degenerate test"


def test_sampled_rows_draw_as_alone_beside_greedy_ones(chars):
    model = tiny("llama-gqa", block_size=64)
    sampled = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.3, seed=3, eos_token_id=[])
    engine = Engine(model, chars, max_batch=4)
    a = engine.submit(PROMPTS[0], 20, GREEDY)
    engine.step()
    b = engine.submit(PROMPTS[1], 20, sampled)
    c = engine.submit(PROMPTS[2], 20, SamplingConfig(repetition_penalty=1.5, temperature=0, eos_token_id=[]))
    run(engine)
    assert b.tokens == generate(model, PROMPTS[1], 20, sampled)[0]
    assert c.tokens == generate(model, PROMPTS[2], 20, temperature=0, repetition_penalty=1.5, eos_token_id=[])[0]
    assert a.tokens == generate(model, PROMPTS[0], 20, GREEDY)[0]
    assert b.tokens != generate(model, PROMPTS[1], 20, GREEDY)[0]


def test_end_tokens_and_stop_strings_finish_as_complete_does(chars):
    model = tiny("gpt2", block_size=64)
    prompt = "hello there"
    full = complete(model, chars, prompt, max_new_tokens=24, temperature=0, eos_token_id=[])
    ids = generate(model, chars.encode(prompt), 24, GREEDY)[0]
    engine = Engine(model, chars, max_batch=2).start()
    try:
        stop = full[9:11]  # a stop string inside the text: the answer ends before its first occurrence
        events = list(engine.submit(chars.encode(prompt), 24, GREEDY, stop=["zzzz", stop]))
        assert "".join(e.text for e in events) == complete(model, chars, prompt, max_new_tokens=24, temperature=0,
                                                          eos_token_id=[], stop=["zzzz", stop])
        assert "".join(e.text for e in events) == full[:full.index(stop)] and events[-1].finish_reason == "stop"
        eos = SamplingConfig(temperature=0, eos_token_id=ids[5])  # an end token: included, not shown as text
        request = engine.submit(chars.encode(prompt), 24, eos)
        events = list(request)
        assert request.tokens == ids[:ids.index(ids[5]) + 1] and events[-1].finish_reason == "stop"
        assert events[-1].completion_tokens == len(request.tokens) and events[-1].prompt_tokens == len(prompt)
        events = list(engine.submit(chars.encode(prompt), 24, GREEDY))
        assert "".join(e.text for e in events) == full and events[-1].finish_reason == "length"
        assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    finally:
        engine.close()


def test_a_cancelled_request_leaves_the_batch_and_frees_its_row(chars):
    model = tiny("mqa", block_size=64)
    engine = Engine(model, chars, max_batch=2, max_queue=1)
    keep, drop = engine.submit(PROMPTS[0], 30, GREEDY), engine.submit(PROMPTS[1], 30, GREEDY)
    engine.step(), engine.step()
    assert engine.running == 2
    drop.cancel()
    engine.step()
    assert engine.running == 1 and drop.finish_reason == "cancelled" and len(drop.tokens) == 3  # prefill + 2 steps
    late = engine.submit(PROMPTS[2], 10, GREEDY)  # takes the freed row
    run(engine)
    assert keep.tokens == generate(model, PROMPTS[0], 30, GREEDY)[0]
    assert late.tokens == generate(model, PROMPTS[2], 10, GREEDY)[0]
    assert [e.finish_reason for e in drop][-1] == "cancelled"


def test_a_full_queue_and_impossible_requests_are_refused(chars):
    model = tiny("llama-gqa", block_size=32)
    engine = Engine(model, chars, max_batch=1, max_queue=1)
    engine.submit([1], 3, GREEDY), engine.submit([2], 3, GREEDY)  # one for the row, one waiting
    with pytest.raises(QueueFull):
        engine.submit([3], 3, GREEDY)
    for args, param in [(([], 3), "prompt"), (([40], 3), "prompt"), (([1], 0), "max_tokens"),
                        (([1] * 30, 3), "max_tokens"), (([1], 2.0), "max_tokens"), (([1.7, 2.2], 3), "prompt"),
                        (("Hello", 3), "prompt")]:
        with pytest.raises(RequestError) as e:
            engine.submit(*args, GREEDY)
        assert e.value.param == param
    with pytest.raises(RequestError, match="stop must be a string"):
        engine.submit([1], 3, GREEDY, stop=5)
    with pytest.raises(ValueError, match="cache_len"):
        Engine(model, chars, cache_len=0)
    with pytest.raises(RequestError, match="num_beams"):
        engine.submit([1], 3, SamplingConfig(num_beams=2))
    run(engine)
    again = engine.submit([3], 3, GREEDY)  # room again: accepted (no QueueFull) and run to its end
    run(engine)
    assert again.finish_reason == "length" and len(again.tokens) == 3


@pytest.mark.slow
def test_compiled_engine_decodes_as_alone(chars):
    model = tiny("llama-gqa", block_size=300)
    engine = Engine(model, chars, max_batch=2, compile=True)
    requests = [engine.submit(PROMPTS[0], 12, GREEDY)]
    engine.step()
    requests.append(engine.submit(PROMPTS[1], 12, GREEDY))
    run(engine)
    assert [r.tokens for r in requests] == [generate(model, p, 12, GREEDY)[0] for p in PROMPTS[:2]]
    assert engine.cache.real.shape == (2, 256)  # static shapes: full batch, 256 slots


def test_a_failed_step_fails_only_the_running_requests_and_the_engine_goes_on(chars):
    model = tiny("llama-gqa", block_size=64)
    engine = Engine(model, chars, max_batch=2)
    running = engine.submit(PROMPTS[0], 20, GREEDY)
    engine.step()
    expected = generate(model, PROMPTS[1], 10, GREEDY)[0]  # replaces the model's cache under the running row
    engine.step()
    events = list(running)
    assert events[-1].finish_reason == "error" and "cache was replaced" in events[-1].error
    assert engine.running == 0
    after = engine.submit(PROMPTS[1], 10, GREEDY)  # an idle engine makes its cache anew
    run(engine)
    assert after.tokens == expected


@pytest.mark.parametrize("name", GENERATORS)
def test_prompt_lookup_requests_decode_as_alone(name, chars):
    """Speculative decoding in the engine: rows keep different numbers of drafts (holes in the cache), requests
    join and leave, the cache packs and grows, and every request's tokens are still those it gets alone."""
    model = tiny(name, block_size=48)
    prompts = PROMPTS[:3] + [[1, 2, 3] * 6, [2], [4, 5, 6, 7, 4, 5, 6, 7, 4]]  # repeats: lookups find n-grams
    alone = [generate(model, p, n, GREEDY)[0] for p, n in zip(prompts, STEPS)]
    engine = Engine(model, chars, max_batch=3, max_queue=10, cache_len=8, draft="prompt-lookup", num_draft=4)
    requests = [engine.submit(prompts[0], STEPS[0], GREEDY)]
    engine.step(), engine.step()
    requests += [engine.submit(p, n, GREEDY) for p, n in zip(prompts[1:], STEPS[1:])]
    run(engine)
    assert [r.tokens for r in requests] == alone
    assert [r.finish_reason for r in requests] == ["length"] * len(prompts)
    accepted, drafted = engine.stats["accepted"], engine.stats["drafted"]
    # (a bigram's next token depends on the last alone, so its lookups are always right)
    assert 0 < accepted <= drafted if name == "bigram" else 0 < accepted < drafted, engine.stats
    assert engine.cache.length > 8


def test_a_seeded_request_draws_the_same_beside_drafting_rows(chars):
    """With prompt lookup each row is checked against its own drafts: a seeded sampled request draws the same
    random numbers, and so the same tokens, whether the rows beside it draft more, fewer or none."""
    model = tiny("llama-gqa", block_size=64)
    sampled = SamplingConfig(temperature=0.9, seed=11, eos_token_id=[])

    def tokens(beside):
        engine = Engine(model, chars, max_batch=3, draft="prompt-lookup", num_draft=4)
        request = engine.submit([3, 11, 4], 20, sampled)
        for prompt in beside:
            engine.submit(prompt, 20, GREEDY)
        run(engine)
        return request.tokens, engine.stats["drafted"]

    alone, drafted_alone = tokens([])
    beside, drafted = tokens([[1, 2, 3] * 6, [4, 5, 6, 7] * 3])  # repeats: these rows draft every step
    assert beside == alone
    assert drafted > drafted_alone


def test_min_new_tokens_holds_back_the_end_token(chars):
    """Greedy rows take the plain argmax unless a setting needs the logits changed: min_new_tokens does."""
    model = tiny("llama-gqa", block_size=64)
    prompt = [4, 5, 6, 7, 4, 5, 6, 7, 4]
    ids = generate(model, prompt, 24, GREEDY)[0]
    cases = [SamplingConfig(temperature=0, eos_token_id=ids[0], min_new_tokens=8),  # held back at prefill too
             SamplingConfig(temperature=0.8, seed=3, eos_token_id=ids[:4], min_new_tokens=12)]
    engine = Engine(model, chars, max_batch=4)
    requests = [engine.submit(prompt, 24, s) for s in cases]
    run(engine)
    for request, settings in zip(requests, cases):
        assert request.tokens == generate(model, prompt, 24, settings)[0]
        assert not set(request.tokens[:settings.min_new_tokens]) & set(settings.eos_ids)


def test_min_new_tokens_builds_no_tensor_per_step(chars, monkeypatch):
    """The end tokens held back are a tensor made once per request, not one more host-to-device copy per step."""
    model = tiny("llama-gqa", block_size=64)
    prompt = [4, 5, 6, 7, 4, 5, 6, 7, 4]
    ids = generate(model, prompt, 24, GREEDY)[0]
    eos = min(set(range(model.config.vocab_size)) - set(ids))  # never chosen: every run decodes 24 tokens
    made, tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: made.append(1) or tensor(*args, **kwargs))

    def tensors_made(min_new_tokens):
        made.clear()
        engine = Engine(model, chars, max_batch=2)
        request = engine.submit(prompt, 24, SamplingConfig(temperature=0, eos_token_id=eos,
                                                           min_new_tokens=min_new_tokens))
        run(engine)
        assert request.tokens == ids
        return len(made)

    assert tensors_made(1) == tensors_made(20)


def test_prompt_lookup_with_end_tokens_penalties_and_sampling(chars):
    model = tiny("llama-gqa", block_size=64)
    prompt = [4, 5, 6, 7, 4, 5, 6, 7, 4]
    ids = generate(model, prompt, 24, GREEDY)[0]
    cases = [SamplingConfig(temperature=0, eos_token_id=ids[6]),
             SamplingConfig(temperature=0, eos_token_id=ids[6], min_new_tokens=8),
             SamplingConfig(temperature=0, repetition_penalty=1.3, eos_token_id=[])]
    engine = Engine(model, chars, max_batch=4, draft="prompt-lookup")
    requests = [engine.submit(prompt, 24, s) for s in cases]
    sampled = engine.submit(prompt, 24, SamplingConfig(temperature=0.8, seed=1, eos_token_id=[]))
    run(engine)
    for request, settings in zip(requests, cases):
        assert request.tokens == generate(model, prompt, 24, settings)[0]
    assert len(sampled.tokens) == 24 and sampled.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt lookup only"):
        Engine(model, chars, draft=model)
    with pytest.raises(ValueError, match="num_draft must be an int >= 1"):
        Engine(model, chars, draft="prompt-lookup", num_draft=0)
