"""zoo.trace, zoo.intervene and zoo.logit_lens (zoo/inspection.py): the residual stream and attention patterns
against transformers' output_hidden_states and output_attentions (eager attention) on tiny random models of each
architecture, left-padded batches included; ablations against recomputation; patching; hooks always removed."""
import copy

import pytest
import torch

import zoo
from zoo.inspection import blocks, final_norm, zero_heads

from conftest import TINY, tiny
from test_pretrained import HF_CASES, V, hf_model

PAD = 3  # left padding of the first row


@pytest.fixture(scope="module")
def transformers_models(transformers, tmp_path_factory):
    """name -> (zoo model, transformers model with eager attention), on the same random weights."""
    models = {}
    for name in HF_CASES:
        folder = tmp_path_factory.mktemp(name)
        hf_model(name).save_pretrained(folder)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        models[name] = zoo.from_pretrained(folder), ref
    return models


@pytest.mark.parametrize("name", HF_CASES)
def test_residual_stream_and_patterns_equal_transformers(name, transformers_models):
    model, ref = transformers_models[name]
    idx = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(0))
    key_mask = torch.ones_like(idx, dtype=torch.bool)
    key_mask[0, :PAD] = False  # row 0 left-padded
    idx[0, :PAD] = 1
    pos = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ref(idx, attention_mask=key_mask.long(), position_ids=pos, output_hidden_states=True,
                  output_attentions=True)
    path, layers = blocks(model)
    n = len(layers)
    head = next(p for p, m in model.named_modules() if m is model.lm_head)
    acts = zoo.trace(model, idx, [f"{path}.0.input", f"{path}.*", f"{head}.input"], attention=True,
                     key_mask=key_mask)
    attention = [k for k in acts if k.endswith(".pattern")]
    assert len(out.hidden_states) == n + 1 and len(attention) == len(out.attentions) == n
    real = key_mask[:, None, :, None]  # compare real query positions; padded ones are each side's own business
    # the block outputs; transformers' last hidden state has the final norm applied: the head's input
    ours = [acts[f"{path}.0.input"]] + [acts[f"{path}.{i}"] for i in range(n - 1)] + [acts[f"{head}.input"]]
    for i, (a, b) in enumerate(zip(ours, out.hidden_states)):
        err = (a - b).abs()[key_mask].max().item()
        assert err <= 1e-5, f"hidden state {i}: max |diff| {err:.2e}"
    for i, (key, b) in enumerate(zip(attention, out.attentions)):
        a = acts[key]
        assert a.shape == b.shape == (2, ref.config.num_attention_heads, 12, 12)
        err = (a - b).abs().masked_fill(~real, 0).max().item()
        assert err <= 1e-5, f"{key}: max |diff| {err:.2e}"
    assert torch.all(acts[attention[0]][0, :, PAD:, :PAD] == 0)  # no real query attends to padding
    # the logit lens's last row is the model's logits; its first, the embeddings through norm and head
    lens = zoo.logit_lens(model, idx, key_mask=key_mask)
    assert lens.shape == (n + 1, 2, 12, V)
    assert torch.equal(lens[-1], model(idx, key_mask=key_mask))
    with torch.no_grad():
        assert torch.equal(lens[0], model.lm_head(final_norm(model)(ours[0])))


@pytest.mark.parametrize("name", ["llama-gqa", "mqa"])
def test_decode_step_pattern_is_the_full_patterns_last_row(name):
    """One new token takes the grouped-query fast path: its pattern is still [B, H, 1, S], per query head, over
    the S slots filled so far (of the cache's 16)."""
    model = tiny(name, std=0.5)
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    full = zoo.trace(model, idx, ["*.*.1.*"], attention=True)
    key = next(k for k in full if k.endswith(".pattern"))
    model.setup_cache(2, 16)
    model(idx[:, :-1], input_pos=torch.arange(8))
    step = zoo.trace(model, idx[:, -1:], [key], input_pos=torch.tensor([8]))[key]
    assert step.shape == (2, model.config.n_head, 1, 9)
    # (float32 rounding: the two passes' scores come from products of other shapes; AVX2's GEMMs part by ~50 ulp)
    torch.testing.assert_close(step, full[key][:, :, -1:], atol=1e-6, rtol=1e-5)


OUT_PROJ = {"llama": "o_proj", "gpt2": "c_proj", "mqa": "c_proj", "scratchformer": "out_proj"}


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "mqa", "scratchformer"])
def test_zero_ablating_a_head_equals_recomputing_without_it(name):
    model = tiny(name, std=0.5)
    arch = TINY[name][0]
    path, layers = blocks(model)
    attn = next(n for n, m in model.named_modules() if n.startswith(f"{path}.1.") and hasattr(m, "attend"))
    h, D = 2, model.config.n_embd // model.config.n_head
    idx = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean = model(idx)
        with zoo.intervene(model, {f"{attn}.attend": zero_heads(h)}):
            ablated = model(idx)
        # the same through the output projection's input, [B, T, H * D]
        with zoo.intervene(model, {f"{attn}.{OUT_PROJ[arch]}.input": lambda x: x.index_fill(-1, torch.arange(h * D, (h + 1) * D), 0)}):
            ablated_in = model(idx)
        # recomputed: a copy whose output projection drops head h's columns
        without = copy.deepcopy(model)
        without.get_submodule(f"{attn}.{OUT_PROJ[arch]}").weight[:, h * D:(h + 1) * D] = 0
        expected = without(idx)
    assert (ablated - clean).abs().max() > 1e-3  # the head mattered
    torch.testing.assert_close(ablated, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ablated_in, expected, atol=1e-6, rtol=0)
    # inside zoo.generate too: greedy tokens equal the recomputed model's
    prompt = idx[0, :4].tolist()
    with zoo.intervene(model, {f"{attn}.attend": zero_heads(h)}):
        during = zoo.generate(model, prompt, 12, temperature=0)
    assert during == zoo.generate(without, prompt, 12, temperature=0)
    assert_no_hooks(model)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_patching_the_clean_activation_restores_the_clean_logits(name):
    model = tiny(name, std=0.5)
    path, _ = blocks(model)
    clean_idx = torch.randint(0, 37, (1, 10), generator=torch.Generator().manual_seed(3))
    corrupt_idx = clean_idx.clone()
    corrupt_idx[0, 2] = (corrupt_idx[0, 2] + 1) % 37
    with torch.no_grad():
        clean, corrupt = model(clean_idx), model(corrupt_idx)
    assert (clean - corrupt).abs().max() > 1e-3
    for layer in (0, 1):
        saved = zoo.trace(model, clean_idx, [f"{path}.{layer}"])[f"{path}.{layer}"]
        with torch.no_grad(), zoo.intervene(model, {f"{path}.{layer}": lambda _: saved}):
            patched = model(corrupt_idx)
        assert torch.equal(patched, clean)
        # a block's input patched: the embedding-level corruption undone from that layer on
        saved = zoo.trace(model, clean_idx, [f"{path}.{layer}.input"])[f"{path}.{layer}.input"]
        with torch.no_grad(), zoo.intervene(model, {f"{path}.{layer}.input": lambda _: saved}):
            assert torch.equal(model(corrupt_idx), clean)


def assert_no_hooks(model):
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"a hook left on {name or 'the model'}"


def test_hooks_are_removed_after_the_call_and_after_an_exception():
    model = tiny("llama-gqa")
    idx = torch.randint(0, 37, (1, 5))
    zoo.trace(model, idx, ["model.layers.*", "model.layers.*.mlp.input"], attention=True)
    assert_no_hooks(model)
    with zoo.intervene(model, {"model.layers.*.mlp": lambda y: y * 0}):
        model(idx)
    assert_no_hooks(model)
    with pytest.raises(RuntimeError, match="in the block"):
        with zoo.intervene(model, {"model.layers.0": lambda y: y, "lm_head.input": lambda x: x}):
            raise RuntimeError("in the block")
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="block_size"):  # the forward itself fails
        zoo.trace(model, torch.zeros(1, 65, dtype=torch.long), ["model.layers.0"], attention=True)
    assert_no_hooks(model)
    with pytest.raises(ZeroDivisionError):  # an edit that fails mid-forward
        with zoo.intervene(model, {"model.layers.1": lambda y: 1 / 0}):
            model(idx)
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="names no module"):  # the second edit is bad: the first is undone
        with zoo.intervene(model, {"model.layers.0": lambda y: y, "model.layer.1": lambda y: y}):
            pass
    assert_no_hooks(model)


def test_trace_keeps_only_what_was_asked():
    model = tiny("gpt2")
    idx = torch.randint(0, 37, (2, 6))
    acts = zoo.trace(model, idx, ["transformer.h.1.mlp"])
    assert list(acts) == ["transformer.h.1.mlp"] and acts["transformer.h.1.mlp"].shape == (2, 6, 32)
    assert list(zoo.trace(model, idx)) == ["transformer.h.0", "transformer.h.1"]  # default: the residual stream
    acts = zoo.trace(model, idx, ["transformer.h.0"], attention=True)
    assert list(acts) == ["transformer.h.0.attn.pattern", "transformer.h.0"]
    probs = acts["transformer.h.0.attn.pattern"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))
    assert torch.all(probs.triu(1) == 0)  # causal
    assert not acts["transformer.h.0"].requires_grad


def test_bad_names_and_edits_are_clear_errors():
    model = tiny("llama-gqa")
    idx = torch.randint(0, 37, (1, 4))
    with pytest.raises(ValueError, match=r"'model\.layer\.\*' names no module .*model\.layers"):
        zoo.trace(model, idx, ["model.layer.*"])
    with pytest.raises(ValueError, match=r"'model\.layerz\.\*' names no module .*look like: model, model\.embed_tokens"):
        zoo.trace(model, idx, ["model.layerz.*"])  # (nothing starts so: the names under model.)
    with pytest.raises(ValueError, match="non-empty list"):
        zoo.trace(model, idx, [])
    with pytest.raises(ValueError, match="no attention module"):
        zoo.trace(model, idx, ["lm_head"], attention=True)
    with pytest.raises(ValueError, match=r"for reading .*self_attn\.attend"):
        with zoo.intervene(model, {"model.layers.0.self_attn.pattern": lambda p: p}):
            pass
    with pytest.raises(TypeError, match="must be a function"):
        with zoo.intervene(model, {"model.layers.0": 0}):
            pass
    for bad in (37, -1):  # (the model files leave the vocabulary check to their callers)
        for call in (zoo.trace, zoo.logit_lens):
            with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 37\)"):
                call(model, torch.tensor([[1, bad]]))
    with pytest.raises(ValueError, match=r"zero_heads\(6,\): this attention's heads are 0..5"):
        with zoo.intervene(model, {"model.layers.0.self_attn.attend": zero_heads(6)}):
            model(idx)
    assert_no_hooks(model)


def test_verify_layers_names_the_first_layer_past_tolerance(tmp_path, capsys, monkeypatch, transformers):
    import zoo.verification
    from zoo.cli import main
    hf_model("llama-gqa-llama3").save_pretrained(tmp_path)
    assert main(["verify", str(tmp_path), "--tokens", "16", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "every layer within tolerance" in out and "layer 1 + final norm" in out
    rows = zoo.verify(str(tmp_path), n_tokens=16, layers=True)["layers"]
    assert [r["name"] for r in rows] == ["embeddings", "layer 0", "layer 1 + final norm"]
    assert all(r["max_abs"] <= 1e-5 * r["max_ref"] for r in rows)

    def load_broken(path):  # zoo's model with a disagreement in block 0's MLP
        model = zoo.from_pretrained(path)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.1
        return model
    monkeypatch.setattr(zoo.verification, "from_pretrained", load_broken)
    assert main(["verify", str(tmp_path), "--tokens", "16", "--layers"]) == 1
    out = capsys.readouterr().out
    assert "first layer past tolerance 0.0001: layer 0\n" in out
    assert out.splitlines()[1].startswith("embeddings") and "<-" not in out.splitlines()[1]


@pytest.mark.slow  # matplotlib's import and two figures: ~5-20 s
def test_inspect_command(tmp_path, capsys, gpt2_bpe):
    pytest.importorskip("matplotlib", reason="zoo inspect's PNGs need matplotlib (pip install 'zoo-lm[plot]')")
    from zoo.cli import main
    tok = zoo.tokenizer("gpt2")
    model = tiny("gpt2", std=0.5, vocab_size=tok.vocab_size)
    zoo.save_pretrained(model, tmp_path / "tiny", tokenizer=tok)
    prompt = "The capital of France is"
    out_dir = tmp_path / "pngs"
    args = ["inspect", str(tmp_path / "tiny"), "--prompt", prompt, "--out", str(out_dir)]
    assert main([*args, "--logit-lens", "--attention", "1", "--head", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    ids = tok.encode(prompt)
    assert [line.split()[0] for line in out[1:4]] == ["embeddings", "layer", "layer"]
    top = model(torch.tensor([ids]))[0].argmax(-1).tolist()  # the last layer's row: the model's own predictions
    assert out[3].startswith("layer 1") and all(repr(tok.decode([t])) in out[3] for t in top)
    pattern = zoo.trace(model, torch.tensor([ids]), ["transformer.h.1"], attention=True)["transformer.h.1.attn.pattern"]
    j = int(pattern[0, 2, -1].argmax())
    assert f"layer 1 head 2: the last token attends most to {tok.decode([ids[j]])!r} (position {j}," in out[5]
    for name in ("logit_lens.png", "attention_layer1_head2.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an earlier PNG is kept unless --force
    (out_dir / "logit_lens.png").write_bytes(b"mine")
    assert main([*args, "--logit-lens"]) == 2
    assert "logit_lens.png exists: pass --force" in capsys.readouterr().err
    assert (out_dir / "logit_lens.png").read_bytes() == b"mine" and len(list(out_dir.iterdir())) == 2
    assert main([*args, "--logit-lens", "--force"]) == 0
    assert (out_dir / "logit_lens.png").read_bytes()[:4] == b"\x89PNG"
    for bad, message in ((["--attention", "2"], "layers are 0..1"), ([], "nothing to inspect"),
                         (["--head", "0"], "pass --attention too"), (["--attention", "0", "--head", "4"], "0..3")):
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_readme_example_on_smollm2(smollm2_gguf):
    """README's worked example: layer 23's head 4 reads " France", and ablating it with heads 0 and 1 turns
    " Paris" into " London"; " France"'s residual stream patched into "The capital of Italy is" gives " Paris"."""
    model, tok = zoo.load_source("smollm2-135m-instruct")
    prompt = "The capital of France is"
    idx = torch.tensor([tok.encode(prompt)])
    acts = zoo.trace(model, idx, ["model.layers.23"], attention=True)
    assert acts["model.layers.23.self_attn.pattern"][0, 4, -1].argmax() == 3  # " France"
    assert acts["model.layers.23.self_attn.pattern"][0, 4, -1, 3] > 0.85
    lens = zoo.logit_lens(model, idx)
    assert lens.shape == (31, 1, 5, 49152)
    assert [tok.decode([int(t)]) for t in lens[-3:, 0, -1].argmax(-1)] == [" the", " capital", " Paris"]
    assert zoo.complete(model, tok, prompt, max_new_tokens=2, temperature=0) == " Paris."
    with zoo.intervene(model, {"model.layers.23.self_attn.attend": zero_heads(0, 1, 4)}):
        assert zoo.complete(model, tok, prompt, max_new_tokens=2, temperature=0) == " London."
    france = zoo.trace(model, idx, ["model.layers.20"])["model.layers.20"]

    def patch(x):
        x = x.clone()
        x[:, 3] = france[:, 3]
        return x
    italy = torch.tensor([tok.encode("The capital of Italy is")])
    with torch.no_grad():
        assert tok.decode([int(model(italy)[0, -1].argmax())]) == " Rome"
        with zoo.intervene(model, {"model.layers.20": patch}):
            assert tok.decode([int(model(italy)[0, -1].argmax())]) == " Paris"


class SoftCappedAttend(torch.nn.Module):
    """What a file with soft-capped scores (Gemma 2) passes its attend: the convention plus `softcap`."""

    def forward(self, q, k, v, mask, causal, dropout_p=0.0, scale=None, softcap=None):
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
        scores = q @ k.transpose(-2, -1) * scale
        scores = softcap * torch.tanh(scores / softcap) + mask
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("case", ["causal", "padded", "sliding window", "scale", "soft-capped"])
def test_pattern_times_values_is_the_attention_output(case):
    """attention_pattern recomputes the softmax from attend's arguments: the pattern applied to the values is
    attend's own output, whatever the mask (causal, padding, a sliding window), scale and soft-cap say."""
    from zoo.inspection import attention_pattern
    attend = next(m for m in tiny("llama-gqa").modules() if type(m).__name__ == "Attend")
    g = torch.Generator().manual_seed(4)
    B, H, H_kv, T, D = 2, 6, 2, 9, 8
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, H_kv, H_kv))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keep = {"causal": None, "padded": causal & (torch.arange(T) >= torch.tensor([[3], [0]]))[:, None, None],
            "sliding window": causal & (torch.arange(T)[:, None] - torch.arange(T) < 3),
            "scale": causal, "soft-capped": causal}[case]
    if case == "padded":
        keep = keep | torch.eye(T, dtype=torch.bool)  # a padded query sees itself (positions_and_mask)
    mask = None if keep is None else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    kwargs = {"scale": 0.3} if case in ("scale", "soft-capped") else {}
    if case == "soft-capped":
        attend, kwargs = SoftCappedAttend(), {**kwargs, "softcap": 2.0}
        q = q * 4  # scores past the cap
    args = (q, k, v, mask, True)
    y = attend(*args, **kwargs)
    pattern = attention_pattern(attend, args, kwargs)
    assert pattern.shape == (B, H, T, T)
    torch.testing.assert_close(pattern @ v.repeat_interleave(H // H_kv, dim=1), y, atol=1e-5, rtol=0)
    if keep is not None:
        assert torch.all(pattern.masked_fill(keep, 0) == 0)  # nothing where the mask hides
