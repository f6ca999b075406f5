"""The model contract, checked for all seven files: shapes, causality, cache == recompute, left
padding, cache reordering, configs, presets, and that each file stands alone; bidirectional attention
(causal=False) in the six transformers; and that the helpers those six repeat stay identical copies."""
import ast
import difflib
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.inspection import final_norm
from zoo.registry import PRESETS

from conftest import TINY, tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_FILES = sorted(p for p in (ROOT / "models").glob("*.py") if p.name != "__init__.py")

# the ones with causal: bool (a sliding window is a causal model's)
ATTENTION = [name for name, (arch, cfg) in TINY.items() if arch != "bigram" and "sliding_window" not in cfg]


@pytest.mark.parametrize("name", TINY)
def test_shapes_and_dtypes(name, device):
    model = tiny(name, device)
    idx = torch.randint(0, 37, (3, 11), device=device)
    logits = model(idx)
    assert logits.shape == (3, 11, 37) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert model(idx[:, :1]).shape == (3, 1, 37)
    bf16 = model.to(torch.bfloat16)(idx)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16.float()).all()


@pytest.mark.parametrize("name", TINY)
def test_config_roundtrip(name):
    model = tiny(name)
    clone = type(model)(model.config)  # the contract: the config alone rebuilds the architecture
    assert clone.config == model.config
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", TINY)
def test_causal(name, device):
    model = tiny(name, device)
    idx = torch.randint(0, 37, (2, 16), device=device)
    base = model(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 37
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t]), "the changed token must change its own logits"


@pytest.mark.parametrize("name", ATTENTION)
def test_bidirectional_sees_later_tokens(name, device):
    """causal=False (a masked LM's attention): a token changes the logits of every earlier one. The weights
    and positions are the causal model's: its state dict loads unchanged, and one token alone gives the same
    logits in both."""
    causal = tiny(name, device)
    model = tiny(name, device, causal=False)
    model.load_state_dict(causal.state_dict())
    idx = torch.randint(0, 37, (2, 16), device=device)
    torch.testing.assert_close(model(idx[:, :1]), causal(idx[:, :1]), rtol=0, atol=1e-6)
    base = model(idx)
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 37
    moved = (model(changed)[:, :15] - base[:, :15]).abs().amax(-1)  # [2, 15]
    assert (moved > 1e-5).all(), f"the last token must change every earlier position's logits: {moved}"


@pytest.mark.parametrize("name", ATTENTION)
def test_bidirectional_left_padding_matches_each_row_alone(name, device):
    """The key mask still hides padding when attention is bidirectional: each row of a padded batch gets
    the logits it gets alone (padding holds random tokens, so that seeing them would show)."""
    model = tiny(name, device, causal=False)
    lengths, T = [9, 4, 6], 9
    rows = [torch.randint(0, 37, (n,), device=device) for n in lengths]
    idx = torch.randint(0, 37, (len(rows), T), device=device)
    key_mask = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
    for row, p in enumerate(rows):
        idx[row, T - len(p):], key_mask[row, T - len(p):] = p, True
    batched = model(idx, key_mask=key_mask)
    for row, p in enumerate(rows):
        torch.testing.assert_close(batched[row, T - len(p):], model(p[None])[0], rtol=0, atol=1e-5)


# transformers' causal LMs attend bidirectionally when given an all-visible 4D attention mask (a 4D mask is
# used as given), so they are the reference for causal=False: the same checkpoint, loaded with causal=False
HF_BIDIRECTIONAL = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=24, n_layer=2, n_head=3, n_positions=32)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=32)),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(
        n_embd=36, n_layer=2, n_head=3, n_positions=32, n_inner=50, multi_query=True)),
    "xglm": ("XGLMForCausalLM", "XGLMConfig", dict(
        d_model=32, ffn_dim=48, num_layers=2, attention_heads=4, max_position_embeddings=32)),
}


@pytest.mark.parametrize("name", HF_BIDIRECTIONAL)
def test_bidirectional_matches_transformers(name, transformers, tmp_path):
    cls, config_cls, kwargs = HF_BIDIRECTIONAL[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=37, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                                               **kwargs)
    ref = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in ref.parameters():  # large enough weights to make logit errors visible
            p.normal_(0.0, 0.3)
    ref.save_pretrained(tmp_path)
    model = zoo.from_pretrained(tmp_path, causal=False)
    assert model.config.causal is False
    idx = torch.randint(0, 37, (2, 12))
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :4] = False  # row 1: 4 tokens of left padding
    full = torch.zeros(2, 1, 12, 12)  # additive: every query sees every key...
    padded = full.masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)  # ...but padding
    with torch.no_grad():
        want = ref(idx, attention_mask=full).logits
        assert (model(idx) - want).abs().max() <= 1e-5
        assert (ref(idx).logits - want).abs().max() > 1e-2, "the causal reference must differ, or this shows nothing"
        want = ref(idx, attention_mask=padded, position_ids=(key_mask.long().cumsum(1) - 1).clamp(min=0)).logits
        assert (model(idx, key_mask=key_mask) - want)[key_mask].abs().max() <= 1e-5


@pytest.mark.parametrize("name", ATTENTION)
def test_bidirectional_refuses_incremental_decoding(name):
    model = tiny(name, causal=False)
    why = r"bidirectional \(causal=False\).*every token's output depends on later tokens"
    with pytest.raises(ValueError, match="setup_cache: this model is " + why):
        model.setup_cache(1, 16)
    with pytest.raises(ValueError, match="input_pos: this model is " + why):
        model(torch.zeros(1, 4, dtype=torch.long), input_pos=torch.arange(4))


def test_decoding_needs_a_cache_and_bigram_has_no_causal_field():
    with pytest.raises(ValueError, match=r"input_pos: no KV cache.*call setup_cache\(batch_size, max_len\) first"):
        tiny("gpt2")(torch.zeros(1, 4, dtype=torch.long), input_pos=torch.arange(4))
    with pytest.raises(ValueError, match="unknown bigram config field.*'causal'"):
        zoo.build("bigram", dict(causal=False))


def greedy_recompute(model, idx, steps):
    """Greedy decoding that recomputes the full sequence every step: the reference."""
    logits = []
    for _ in range(steps):
        out = model(idx)[:, -1]
        logits.append(out)
        idx = torch.cat([idx, out.argmax(-1, keepdim=True)], dim=1)
    return idx, torch.stack(logits, 1)


def greedy_cached(model, idx, steps, key_mask=None):
    B, T = idx.shape
    model.setup_cache(B, T + steps)
    out = model(idx, input_pos=torch.arange(T, device=idx.device), key_mask=key_mask)[:, -1]
    logits = [out]
    for t in range(T, T + steps - 1):
        nxt = out.argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
        out = model(nxt, input_pos=torch.tensor([t], device=idx.device), key_mask=key_mask)[:, -1]
        logits.append(out)
    return torch.cat([idx, out.argmax(-1, keepdim=True)], 1), torch.stack(logits, 1)


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_equals_recompute(name, device):
    model = tiny(name, device)
    prompt = torch.randint(0, 37, (2, 9), device=device)
    ref_idx, ref_logits = greedy_recompute(model, prompt, 20)
    idx, logits = greedy_cached(model, prompt, 20)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("name", TINY)
def test_forward_between_decoding_steps_ignores_the_cache(name, device):
    """Training or scoring in the middle of decoding (a forward without input_pos) neither reads the cache's
    keys and values, which belong to another sequence, nor overwrites them, so decoding resumes unharmed."""
    model = tiny(name, device)
    prompt = torch.randint(0, 37, (2, 6), device=device)
    other = torch.randint(0, 37, (2, 16), device=device)  # as long as the cache: reading it would cover every slot
    key_mask = torch.ones(2, 16, dtype=torch.bool, device=device)
    key_mask[1, :5] = False
    before = [model(other), model(other, key_mask=key_mask)]  # no cache exists yet
    ref_idx, ref_logits = greedy_recompute(model, prompt, 8)
    model.setup_cache(2, 16)
    logits = [model(prompt, input_pos=torch.arange(6, device=device))[:, -1]]
    for t in range(6, 13):
        if t == 9:  # the cache now holds prompt + 3 decoded tokens; this sequence is another
            during = [model(other), model(other, key_mask=key_mask)]
        logits.append(model(ref_idx[:, t:t + 1], input_pos=torch.tensor([t], device=device))[:, -1])
    for got, want in zip(during, before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(logits, 1), ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_last_only_is_the_last_position(name, device):
    model = tiny(name, device)
    idx = torch.randint(0, 37, (2, 9), device=device)
    last = model(idx, last_only=True)
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last, model(idx)[:, -1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [name for name, (arch, _) in TINY.items() if arch != "bigram"])
def test_hidden_state_then_logits_is_forward(name, device):
    """forward(..., hidden=True) is the final norm's output [B, T, n_embd] (the norm zoo.trace finds), and logits(h)
    of it is forward's logits, bit for bit (zoo's chunked losses and scoring rely on it); with last_only and a cache
    too."""
    model = tiny(name, device, std=0.3)
    idx = torch.randint(0, 37, (2, 9), device=device)
    normed = []
    hook = final_norm(model).register_forward_hook(lambda module, args, out: normed.append(out))
    h = model(idx, hidden=True)
    hook.remove()
    assert h.shape == (2, 9, model.config.n_embd) and torch.equal(h, normed[0])
    assert torch.equal(model.logits(h), model(idx))
    assert torch.equal(model.logits(model(idx, last_only=True, hidden=True)), model(idx, last_only=True))
    model.setup_cache(2, 16)
    step = model(idx, input_pos=torch.arange(9, device=device), hidden=True)
    assert torch.equal(model.logits(step), model(idx, input_pos=torch.arange(9, device=device)))


@pytest.mark.parametrize("name", TINY)
def test_left_padding_matches_each_prompt_alone(name, device):
    model = tiny(name, device)
    lengths, steps = [9, 4, 6], 20
    prompts = [torch.randint(0, 37, (n,), device=device) for n in lengths]
    T = max(lengths)
    idx = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long, device=device), p]) for p in prompts])
    key_mask = torch.ones(len(prompts), T + steps, dtype=torch.bool, device=device)
    for row, n in enumerate(lengths):
        key_mask[row, :T - n] = False
    idx_b, logits_b = greedy_cached(model, idx, steps, key_mask)
    # the padded batch without a cache (key_mask covers exactly the T prompt tokens)
    full = model(idx, key_mask=key_mask[:, :T])[:, -1]
    torch.testing.assert_close(full, logits_b[:, 0], rtol=0, atol=1e-5)
    for row, p in enumerate(prompts):
        alone_idx, alone_logits = greedy_recompute(model, p[None], steps)
        torch.testing.assert_close(logits_b[row], alone_logits[0], rtol=0, atol=1e-5)
        assert torch.equal(idx_b[row, T:], alone_idx[0, len(p):])


@pytest.mark.parametrize("name", TINY)
def test_reorder_cache(name, device):
    model = tiny(name, device)
    prompt = torch.randint(0, 37, (3, 7), device=device)
    model.setup_cache(3, 16)
    model(prompt, input_pos=torch.arange(7, device=device))
    order = torch.tensor([2, 2, 0], device=device)  # beam search keeps some rows, repeats others
    model.reorder_cache(order)
    nxt = torch.randint(0, 37, (3, 1), device=device)
    out = model(nxt, input_pos=torch.tensor([7], device=device))[:, -1]
    ref = model(torch.cat([prompt[order], nxt], 1))[:, -1]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [name for name, (arch, _) in TINY.items() if arch != "bigram"])
def test_cache_rows_read_and_written_through_views_as_alone(name):
    """The cache as zoo/engine.py uses it (models/__init__.py): after setup_cache every attention module's kv_cache
    holds k and v [B, H_kv, S, D], cache_batch and cache_len giving B and S; with k and v pointed at views of some
    rows (cache_batch set to match) the model reads and writes its cache only through them: prompts prefilled
    row by row and a step of two rows decode as those rows alone, and the rows left out keep their keys."""
    model = tiny(name)
    prompt, nxt = torch.randint(0, 37, (3, 6)), torch.randint(0, 37, (3, 1))
    model.setup_cache(3, 16)
    caches = [m.kv_cache for m in model.modules() if isinstance(getattr(m, "kv_cache", None), torch.nn.Module)]
    assert caches and (model.cache_batch, model.cache_len) == (3, 16)
    assert all(c.k.dim() == 4 and c.k.shape[::2] == (3, 16) and c.v.shape[:3] == c.k.shape[:3] for c in caches)
    full = [(c.k, c.v) for c in caches]

    def use_rows(lo, hi):
        for c, (k, v) in zip(caches, full):
            c.k, c.v = k[lo:hi], v[lo:hi]
        model.cache_batch = hi - lo

    for row in range(3):  # each prompt alone, through a view of its row
        use_rows(row, row + 1)
        model(prompt[row:row + 1], input_pos=torch.arange(6))
    kept = [k[0].clone() for k, _ in full]
    use_rows(1, 3)
    key_mask = (torch.arange(16) < 7).expand(2, 16)
    step = model(nxt[1:], input_pos=torch.tensor([6]), key_mask=key_mask)[:, -1]
    torch.testing.assert_close(step, model(torch.cat([prompt, nxt], 1)[1:])[:, -1], rtol=0, atol=1e-5)
    assert all(torch.equal(k[0], before) for (k, _), before in zip(full, kept))  # row 0: untouched
    use_rows(0, 1)
    step = model(nxt[:1], input_pos=torch.tensor([6]))[:, -1]
    torch.testing.assert_close(step, model(torch.cat([prompt, nxt], 1)[:1])[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,bad,message", [
    ("gpt2", dict(n_embd=30, n_head=4), "divisible by n_head"),
    ("mqa", dict(n_embd=30, n_head=4), "divisible by n_head"),
    ("scratchformer", dict(n_embd=30, n_head=4), "divisible by n_head"),
    ("scratchformer", dict(activation="swish"), "activation"),
    ("gpt2", dict(activation="relu"), "activation"),
    ("llama", dict(n_embd=48, n_head=6, n_kv_head=4), "multiple of n_kv_head"),
    ("llama", dict(n_embd=48, n_head=6, n_kv_head=0), "n_kv_head"),  # (the range check comes first)
    ("llama", dict(n_embd=50, n_head=6, n_kv_head=2), "divisible by n_head"),
    ("llama", dict(n_embd=48, n_head=6, n_kv_head=2, qk_norm="layer"), "qk_norm must be one of"),
    ("llama", dict(n_embd=48, n_head=6, n_kv_head=2, norm_position="sandwich"), "norm_position must be one of"),
    ("llama", dict(n_embd=48, n_head=6, n_kv_head=2, rotary_fraction=0.375), "even number"),  # 3 of 8 dims
    ("llama", dict(n_embd=48, n_head=6, n_kv_head=2, causal=False, sliding_window=4), "causal model"),
    ("llama", dict(n_embd=48, n_head=6, n_kv_head=2, block_size=64, rope_scaling=dict(
        short_factor=[1.0] * 4, long_factor=[1.0] * 4, attention_factor=1.0, original_max_position_embeddings=32)),
     "block_size .64. must be <= original_max_position_embeddings .32."),
    ("bigram", dict(vocab_size=0), "vocab_size"),
])
def test_impossible_configs_raise_value_error(arch, bad, message):
    with pytest.raises(ValueError, match=message):
        zoo.build(arch, bad)


def test_sequence_longer_than_block_size_is_refused():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.setup_cache(1, 65)


# Published parameter counts of the weights each preset matches (Hugging Face's num_parameters()).
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
    "distilgpt2": 81_912_576, "smollm2-135m": 134_515_008, "smollm2-135m-instruct": 134_515_008,
    "smollm2-360m": 361_821_120, "smollm2-360m-instruct": 361_821_120, "tinyllama-1.1b": 1_100_048_384,
    "tiny-starcoder": 164_144_128, "xglm-564m": 564_463_616,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-0.5b-instruct": 494_032_768, "qwen2.5-1.5b-instruct": 1_543_714_304,
    "qwen3-0.6b": 596_049_920, "phi-4-mini-instruct": 3_836_021_760,
    "olmo-2-1b": 1_484_916_736, "olmo-2-1b-instruct": 1_484_916_736, "mistral-7b-instruct": 7_248_023_552,
    "gemma-3-270m": 268_098_176, "gemma-3-270m-it": 268_098_176,
    "gemma-3-1b": 999_885_952, "gemma-3-1b-it": 999_885_952, "gemma-2-2b": 2_614_341_888,
    "gemma-2-2b-it": 2_614_341_888, "gemma-2b": 2_506_172_416,
    "shakespeare-char": 804_096,  # nanoGPT's baby config reports 0.80M
    # the mixtures of experts, as their cards round them: 6.9B, 14.3B, 30.5B, 46.7B
    "olmoe-1b-7b": 6_919_161_856, "qwen1.5-moe-a2.7b": 14_315_784_192, "qwen3-30b-a3b": 30_532_122_624,
    "mixtral-8x7b-instruct": 46_702_792_704,
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_on_meta(name):
    preset = PRESETS[name]
    with torch.device("meta"):
        model = zoo.load(name).to("meta")  # derived buffers (rope, sinusoids) are built on the CPU
    n = sum(p.numel() for p in model.parameters())
    if name in PUBLISHED:
        assert n == PUBLISHED[name]
    idx = torch.zeros(2, 5, dtype=torch.long, device="meta")
    assert model(idx).shape == (2, 5, preset.config["vocab_size"])


def test_preset_shapes_the_issue_names():
    c = zoo.load("scratchformer").config
    assert (c.n_layer, c.n_head, c.n_embd, c.ffn_dim, c.block_size, c.vocab_size) == (4, 8, 512, 1024, 256, 50257)
    assert (c.activation, c.norm_first, c.dropout) == ("relu", False, 0.0)
    c = zoo.load("shakespeare-char").config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, c.bias, c.dropout) == (4, 4, 128, 64, 65, False, 0.0)
    assert zoo.load("bigram").config.vocab_size == 65


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown model 'gtp2'; did you mean 'gpt2'.*known: .*smollm2-135m"):
        zoo.load("gtp2")
    with pytest.raises(ValueError, match=r"unknown gpt2 config field\(s\) 'n_layr'; valid fields: .*n_layer"):
        zoo.load("gpt2", n_layr=2)
    assert "gpt2" in zoo.list() and len(zoo.list()) == len(PRESETS)
    assert zoo.load("gpt2", n_layer=1, n_embd=64, n_head=2).config.n_layer == 1


class _Calls(torch.overrides.TorchFunctionMode):
    """Records the torch functions called inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
@pytest.mark.parametrize("H, H_kv, T", [(4, 4, 64), (6, 2, 128), (4, 1, 7)])
def test_written_out_attention_matches_sdpa(H, H_kv, T, autocast):
    """Short causal blocks in bf16 on the CPU (as training runs them) take Attend's written-out path, not SDPA; its
    output and gradients are as close to SDPA's in float32 on the same inputs as SDPA's own bf16 kernel is. Under
    bf16 autocast the rotary models hand q and k over in float32 (their cos and sin tables are the residual
    stream's dtype) and v in bf16: the same path. (The files' Attend classes are identical copies:
    test_repeated_helpers_are_identical_copies.)"""
    from zoo.models.llama import Attend
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, T, 16, generator=g).bfloat16() for h in (H, H_kv, H_kv))
    grad = torch.randn(3, H, T, 16, generator=g).bfloat16()

    def run(attend, dtype, amp=False):
        leaves = [t.detach().to(torch.float32 if amp and t is not v else dtype).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = attend(*leaves)
        out.backward(grad.to(out.dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    with _Calls() as calls:
        ours = run(lambda q, k, v: Attend()(q, k, v, None, True), torch.bfloat16, amp=autocast)
    assert "scaled_dot_product_attention" not in calls.names, "the written-out path was not taken"
    exact, kernel = run(sdpa, torch.float32), run(sdpa, torch.bfloat16)
    for name, a, b, c in zip(("output", "dq", "dk", "dv"), ours, exact, kernel):
        err, kernel_err = (a - b).abs().max().item(), (c - b).abs().max().item()
        assert err <= 2 * kernel_err + 1e-3, f"{name}: {err} off float32 SDPA, where SDPA's bf16 is {kernel_err} off"


def test_model_files_import_only_torch_and_stdlib():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for path in MODEL_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
        assert len(path.read_text().splitlines()) <= 350, f"{path.name} should read in one sitting"


# Helpers the six transformer files repeat on purpose (each file must run alone): they must stay copies. The
# one difference allowed is where each file keeps its layers and their attention (Hugging Face's module names).
SHARED = ["Attend", "KVCache", "Model.setup_cache", "Model.reorder_cache", "Model.positions_and_mask"]
LAYER_PATHS = {"llama": ("self.model.layers", "block.self_attn"), "gpt2": ("self.transformer.h", "block.attn"),
               "mqa": ("self.transformer.h", "block.attn"), "scratchformer": ("self.model.layers", "block.self_attn"),
               "gemma": ("self.model.layers", "block.self_attn"),
               "moe": ("self.model.layers", "block.self_attn")}


def shared_source(arch, name):
    """The source of class or method `name` ("Class.method") in models/<arch>.py, comments included, with
    the file's path to its layers written LAYERS and to their attention block.ATTN."""
    source = (ROOT / "models" / f"{arch}.py").read_text()
    node = ast.parse(source)
    for part in name.split("."):
        node = next((n for n in node.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part), None)
        assert node is not None, f"models/{arch}.py has no {name}"
    layers, attn = LAYER_PATHS[arch]
    return ast.get_source_segment(source, node, padded=True).replace(layers, "LAYERS").replace(attn, "block.ATTN")


@pytest.mark.parametrize("name", SHARED)
def test_repeated_helpers_are_identical_copies(name):
    reference = shared_source("llama", name)
    for arch in LAYER_PATHS:
        copy = shared_source(arch, name)
        diff = "".join(difflib.unified_diff(reference.splitlines(True), copy.splitlines(True),
                                            "models/llama.py", f"models/{arch}.py"))
        assert copy == reference, f"{name}: the copies differ; change all of them alike\n{diff}"


@pytest.mark.slow
@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_file_runs_alone(path, tmp_path):
    """Copy one file into an empty folder and use it from a fresh interpreter that cannot see the repo."""
    shutil.copy(path, tmp_path / path.name)
    script = f"""
import sys
assert {str(ROOT)!r} not in sys.path
import torch, {path.stem} as m
assert 'zoo' not in sys.modules
cfg = m.Config(**{TINY[{'llama': 'llama-gqa', 'gemma': 'gemma3'}.get(path.stem, path.stem)][1]!r})
model = m.Model(cfg).eval()
idx = torch.randint(0, 37, (2, 8))
full = model(idx)
model.setup_cache(2, 16)
step = model(idx, input_pos=torch.arange(8))
assert full.shape == (2, 8, 37) and torch.allclose(full, step, atol=1e-5)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

