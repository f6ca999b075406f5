"""Mixtures of experts (models/moe.py): tiny random transformers models of each family -- Mixtral, OLMoE,
Qwen2-MoE, Qwen3-MoE, with k = 1, 2 and 4, with and without the shared expert, renormalisation and dense
layers -- load with the same logits and router logits, export back, and decode through the cache as they
compute whole; the load-balancing loss is transformers' per layer; bad configs name their field."""
import dataclasses
import json
import re

import pytest
import torch

import zoo
from zoo import convert

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

V = 101  # vocabulary of the tiny models
ATTN = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
# name -> (transformers class, config class, config)
CASES = {
    "mixtral-k2": ("MixtralForCausalLM", "MixtralConfig", dict(
        ATTN, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, rope_theta=5000.0)),
    "mixtral-k1-tied": ("MixtralForCausalLM", "MixtralConfig", dict(
        ATTN, intermediate_size=24, num_local_experts=8, num_experts_per_tok=1, tie_word_embeddings=True)),
    "olmoe-k4": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        ATTN, intermediate_size=16, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False)),
    "olmoe-k2-norm": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        ATTN, intermediate_size=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-4)),
    "qwen2_moe-shared-dense": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        ATTN, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
        num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen2_moe-step2-k4-norm": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        ATTN, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=8,
        num_experts_per_tok=4, decoder_sparse_step=2, norm_topk_prob=True)),
    "qwen3_moe-head_dim": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        ATTN, head_dim=12, intermediate_size=40, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0])),
    "qwen3_moe-k1": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        ATTN, intermediate_size=40, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=1)),
}


def hf_model(name, seed=0, **changes):
    """A tiny transformers model with random weights large enough to make logit (and routing) errors visible."""
    cls, config_cls, kwargs = CASES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                                               **{**kwargs, **changes})
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def tokens(B=2, T=24, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def router_logits(model):
    return [b.mlp.router_logits for b in model.model.layers if hasattr(b.mlp, "router_logits")]


@pytest.mark.parametrize("name", CASES)
def test_transformers_to_zoo_and_back(name, tmp_path):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path / "hf")
    model = zoo.from_pretrained(tmp_path / "hf")
    idx = tokens()
    with torch.no_grad():
        out, theirs = model(idx), ref(idx, output_router_logits=True)
    assert (out - theirs.logits).abs().max().item() <= 1e-5
    ours = router_logits(model)
    assert len(ours) == len(theirs.router_logits) == 3 - len(model.config.dense_layers)
    for a, b in zip(ours, theirs.router_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    aux, z, counts = model.router_losses()
    k = model.config.top_k  # Switch's loss of each layer (transformers' function on one layer at a time), averaged
    per_layer = [load_balancing_loss_func((r,), model.config.n_expert, k) for r in theirs.router_logits]
    torch.testing.assert_close(aux, torch.stack(per_layer).mean().float(), rtol=1e-6, atol=1e-6)
    assert (counts.sum(dim=1) == idx.numel() * k).all()
    assert (counts.max(dim=1).values > 1).all()  # tokens share experts: the grouping is exercised

    zoo.save_pretrained(model, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [CASES[name][0]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == CASES[name][0]
    with torch.no_grad():
        assert (back(idx).logits - out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["mixtral-k2", "qwen2_moe-shared-dense", "qwen3_moe-head_dim"])
def test_decoding_one_token_reads_only_its_experts(name, tmp_path):
    """Cache = recomputation, token by token, and a decoding step runs only the k experts the token picks
    (the others' weights are poisoned with NaN: reading one would show)."""
    ref = hf_model(name)
    ref.save_pretrained(tmp_path / "hf")
    model = zoo.from_pretrained(tmp_path / "hf")
    idx = tokens(B=1, T=12)
    with torch.no_grad():
        whole = model(idx)
        model.setup_cache(1, 16)
        model(idx[:, :-1], input_pos=torch.arange(11))
        picks = {}
        for i, b in enumerate(model.model.layers):  # where the last token goes, from the whole pass
            if hasattr(b.mlp, "router_logits"):
                picks[i] = set()
        model(idx)  # the whole pass again (no cache) to read each layer's picks for the last token
        for i in picks:
            logits = model.model.layers[i].mlp.router_logits[-1]
            picks[i] = set(logits.topk(model.config.top_k).indices.tolist())
            experts = model.model.layers[i].mlp.experts
            for e in set(range(model.config.n_expert)) - picks[i]:
                experts.gate_up_proj[e] = float("nan")
                experts.down_proj[e] = float("nan")
        step = model(idx[:, -1:], input_pos=torch.tensor([11]))
    assert len(picks) and all(len(p) < model.config.n_expert for p in picks.values())  # experts left unread
    assert (step[0, -1] - whole[0, -1]).abs().max().item() <= 1e-5


def test_left_padding_matches_each_row_alone(tmp_path):
    ref = hf_model("olmoe-k4")
    ref.save_pretrained(tmp_path / "hf")
    model = zoo.from_pretrained(tmp_path / "hf")
    a, b = tokens(B=1, T=10, seed=2), tokens(B=1, T=6, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[1, :4] = False
    with torch.no_grad():
        both = model(batch, key_mask=key_mask)
        torch.testing.assert_close(both[0], model(a)[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(both[1, 4:], model(b)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(top_k=5), "top_k (5) must be between 1 and n_expert (4)"),
    (dict(qk_norm="rows"), "qk_norm must be None, 'proj' or 'head'"),
    (dict(dense_layers=[2]), "dense_layers [2] must be < n_layer (2) and need ffn_dim"),
])
def test_impossible_configs_name_the_field(change, message):
    base = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_kv_head=2, n_embd=8, n_expert=4, top_k=2,
                expert_dim=8)
    with pytest.raises(ValueError, match=re.escape(message)):
        zoo.build("moe", {**base, **change})


def test_expert_count_disagreeing_with_the_checkpoint_is_named(tmp_path):
    ref = hf_model("olmoe-k2-norm")
    ref.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for n in (4, 8):  # fewer experts than the checkpoint holds, and more
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_experts": n}))
        listed = r"unexpected: .*experts\.5\." if n == 4 else r"missing: .*experts\.7\."
        with pytest.raises(ValueError, match=listed) as e:
            zoo.from_pretrained(tmp_path / "hf")
        assert "does not fit models/moe.py" in str(e.value)
        assert f"n_expert (num_experts) is {n}, but the checkpoint's expert tensors hold 6 experts per layer: " \
               "set it to 6" in str(e.value)
    write_gguf(tmp_path / "m.gguf", ref)  # stacked experts: their leading size
    with pytest.raises(ValueError, match=re.escape("the override (--set) n_expert=4 (it holds 6) would change the "
                                                   "shapes of its weights")):
        zoo.from_pretrained(tmp_path / "m.gguf", n_expert=4)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 7}))
    with pytest.raises(ValueError, match=r"top_k \(7\) must be between 1 and n_expert \(6\)"):
        zoo.from_pretrained(tmp_path / "hf")


def test_qwen3_moe_reads_either_spelling_of_the_expert_count():
    base = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": V, "hidden_size": 32, "intermediate_size": 40,
            "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4}
    for key in ("num_experts", "num_local_experts"):
        assert convert.from_hf_config({**base, key: 6})[1]["n_expert"] == 6
    with pytest.raises(ValueError, match="num_experts=null"):
        convert.from_hf_config(base)


@pytest.mark.slow
def test_training_keeps_every_expert_in_use(tmp_path, shared_data):
    """A short `zoo train moe-shakespeare` (shrunk) logs the router losses apart from the LM loss, and its
    load-balancing loss leaves no expert of any layer unused."""
    out = tmp_path / "run"
    zoo.train("moe-shakespeare", [shared_data / "tinyshakespeare.txt"], out, tokenizer="char",
              overrides=dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=2, expert_dim=32), max_iters=40,
              log_interval=10, eval_interval=40, eval_iters=2, block_size=32, batch_size=8, warmup=0,
              device="cpu", bf16=False, progress=False)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "aux_loss" in r]
    assert len(logged) == 4 and all("loss" in r and "z_loss" in r for r in logged)
    assert all(1.9 < r["aux_loss"] < 2.5 for r in logged)  # top_k = 2 when balanced
    assert logged[-1]["expert_share_min"] > 0 and logged[-1]["expert_share_max"] < 0.5, logged


def test_router_losses_gradient_reaches_the_router():
    """The load-balancing loss trains the router (its gradient is not cut by the top-k), and the z-loss is
    the mean squared logsumexp of the router logits."""
    model = zoo.build("moe", dict(vocab_size=37, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                                  n_expert=4, top_k=2, expert_dim=8))
    model(tokens(B=2, T=8) % 37)
    aux, z, counts = model.router_losses()
    logits = model.model.layers[0].mlp.router_logits
    torch.testing.assert_close(z, logits.float().logsumexp(-1).square().mean())
    aux.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert counts.shape == (1, 4) and counts.sum() == 2 * 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lists", [False, True], ids=["stacked", "lists"])
@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "skewed"])
@pytest.mark.parametrize("width", [(16, 8), (12, 6)], ids=["16x8", "12x6"])
def test_experts_padded_in_training_equal_each_pair_alone(dtype, lists, skewed, width):
    """In training each expert's (token, expert) pairs run padded to a multiple of 32 rows (oneDNN builds a kernel
    per new shape), stacked experts all to one length in one batched matmul where that at most doubles the rows;
    outside training, exactly its pairs (stacked on the CPU: every pair in one grouped matmul, where its rows are
    multiples of 16 bytes, as torch's kernel needs; 12 x 6 are not); an unused expert is never called alone. Each way
    computes what each pair's expert computes on its token alone, outputs and gradients, stacked or as lists."""
    torch.manual_seed(0)
    experts = zoo.build("moe", dict(vocab_size=37, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=width[0],
                                    n_expert=8, top_k=2, expert_dim=width[1])).model.layers[0].mlp.experts.to(dtype)
    x, weights, n = torch.randn(64, width[0], dtype=dtype), torch.rand(64, 2, dtype=dtype), torch.arange(64)
    ids = torch.stack([n * 0, 1 + n % 6] if skewed else [n % 7, (n % 7 + 1 + n % 6) % 7], 1)  # [N, 2]; 7: unused
    if lists:
        experts.expert_weights = lambda: (experts.gate_up_proj.unbind(), experts.down_proj.unbind())
    calls, expert = [], experts.expert
    experts.expert = lambda t, *w, **kw: calls.append(tuple(t.shape[:-1])) or expert(t, *w, **kw)

    def grads():
        y.float().square().sum().backward()
        return x.grad, experts.gate_up_proj.grad, experts.down_proj.grad

    x.requires_grad_()
    y = sum(weights[:, j, None] * expert(x[:, None], experts.gate_up_proj[ids[:, j]], experts.down_proj[ids[:, j]])[:, 0]
            for j in range(2))  # [N, D]: each pair's expert on its token alone, weighted, summed
    ref, ref_grads = y.detach(), [g.clone() for g in grads()]
    x.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
    calls.clear()
    y = experts(x, weights, ids)
    counts = ids.flatten().bincount(minlength=8).tolist()
    padded = [(-(-c // 32) * 32,) for c in counts if c]  # skewed: 64, then 32s; balanced: 32s (8 x 32 = 2 N k)
    assert calls == ([(8, 32)] if not lists and not skewed else padded) and counts[7] == 0
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else {}  # bf16: 1 ulp
    torch.testing.assert_close(y, ref, **tol)
    for a, b in zip(grads(), ref_grads):
        torch.testing.assert_close(a, b, **tol)
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(experts(x, weights, ids), ref, **tol)
    grouped = not lists and width == (16, 8)
    assert calls == ([(sum(counts),)] if grouped else [(c,) for c in counts if c])  # all pairs, or each used expert's


# ------------------------------------------------------------------------------------------ GGUF

def write_gguf(path, ref, expert_types=None):
    """`ref` (a transformers MoE) as llama.cpp's converter writes it: experts stacked into ffn_*_exps tensors
    [E, rows, cols]; Mixtral as a llama with an expert count and its q/k rows permuted (the other three use
    the NEOX rotary layout, unpermuted). expert_types: {"gate"|"up"|"down": ggml type name} stores those expert
    tensors quantized (float32 otherwise)."""
    gguf = pytest.importorskip("gguf")
    c, sd = ref.config, {k: v.numpy() for k, v in ref.state_dict().items()}
    arch = {"mixtral": "llama", "olmoe": "olmoe", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[c.model_type]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_feed_forward_length(c.intermediate_size)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if arch == "qwen3moe":
        w.add_key_length(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    w.add_token_list([f"t{i}" for i in range(V)])

    def permute(t, n_head):  # llama.cpp (llama only): interleave the two rotary halves of each head
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."  # transformers' in-memory names: experts stacked, router mlp.gate
        names = {"attn_norm": "input_layernorm", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_q_norm": "self_attn.q_norm",
                 "attn_k_norm": "self_attn.k_norm", "ffn_gate_inp": "mlp.gate",
                 "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                 "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj"}
        for g, h in names.items():
            for kind in ("weight", "bias"):
                if p + h + "." + kind in sd:
                    t = sd[p + h + "." + kind]
                    if arch == "llama" and g in ("attn_q", "attn_k"):
                        t = permute(t, c.num_attention_heads if g == "attn_q" else c.num_key_value_heads)
                    w.add_tensor(f"{b}{g}.{kind}", t)
        gate_up = sd[p + "mlp.experts.gate_up_proj"]  # [E, 2F, D]
        F_ = gate_up.shape[1] // 2
        for part, t in (("gate", gate_up[:, :F_]), ("up", gate_up[:, F_:]), ("down", sd[p + "mlp.experts.down_proj"])):
            qtype = getattr(gguf.GGMLQuantizationType, (expert_types or {}).get(part, "F32"))
            t = t.copy() if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(t.copy(), qtype)
            w.add_tensor(f"{b}ffn_{part}_exps.weight", t, raw_dtype=qtype)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# llama.cpp's qwen2moe and qwen3moe have no dense layers (and renormalise never and always, as these cases do)
@pytest.mark.parametrize("name", ["mixtral-k2", "mixtral-k1-tied", "olmoe-k4", "qwen2_moe-shared-dense",
                                  "qwen3_moe-head_dim"])
def test_gguf_with_stacked_experts(name, tmp_path):
    ref = hf_model(name, mlp_only_layers=[]) if name.startswith("qwen") else hf_model(name)
    write_gguf(tmp_path / "m.gguf", ref)
    model = zoo.from_pretrained(tmp_path / "m.gguf")
    # the GGUF map reads the config the Hugging Face map reads (but for what GGUF does not hold)
    got, want = dataclasses.asdict(model.config), convert.from_hf_config(ref.config.to_dict())[1]
    assert got.pop("norm_eps") == pytest.approx(want.pop("norm_eps"))  # float32 in GGUF
    assert {k: v for k, v in got.items() if k in want and k not in ("aux_loss_coef", "ffn_dim")} == \
           {k: v for k, v in want.items() if k not in ("aux_loss_coef", "ffn_dim")}
    idx = tokens()
    with torch.no_grad():
        assert (model(idx) - ref(idx).logits).abs().max().item() <= 1e-5


def test_gguf_dense_llama_and_mixtral_are_told_apart_by_the_expert_count():
    meta = {"general.architecture": "llama", "llama.block_count": 1, "llama.attention.head_count": 2,
            "llama.embedding_length": 8, "llama.feed_forward_length": 16,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    shapes = {"token_embd.weight": (V, 8)}
    assert convert.from_gguf_metadata(meta, shapes, "m.gguf")[0] == "llama"
    moe = {**meta, "llama.expert_count": 4, "llama.expert_used_count": 2}
    assert convert.from_gguf_metadata(moe, shapes, "m.gguf")[0] == "moe"
    with pytest.raises(ValueError, match="GGUF architecture 'gemma9' is not supported"):
        convert.from_gguf_metadata({**meta, "general.architecture": "gemma9"}, shapes, "m.gguf")


# ------------------------------------------------------------------------------- generation, verify

def test_greedy_generation_matches_transformers(tmp_path):
    """zoo.generate on two prompts of different lengths (one batch, left-padded) = transformers' greedy
    generate on each prompt alone."""
    ref = hf_model("qwen2_moe-shared-dense")
    ref.save_pretrained(tmp_path / "hf")
    model = zoo.from_pretrained(tmp_path / "hf")
    prompts = [tokens(B=1, T=7, seed=4)[0].tolist(), tokens(B=1, T=3, seed=5)[0].tolist()]
    ours = zoo.generate(model, prompts, 8, temperature=0, eos_token_id=[])
    for prompt, new in zip(prompts, ours):
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert new == theirs[0, len(prompt):].tolist()


def test_zoo_verify_on_a_mixture_of_experts(tmp_path):
    hf_model("olmoe-k4").save_pretrained(tmp_path / "hf")
    r = zoo.verify(str(tmp_path / "hf"), n_tokens=32)
    assert r["max_abs"] <= 1e-5 and r["top1"] == 1.0


# ------------------------------------------------------------------------------------ quantized experts

def tiny_moe(seed=0):
    """A zoo MoE whose expert sizes the int4 groups of 32 divide (n_embd 64, expert_dim 32)."""
    torch.manual_seed(seed)
    model = zoo.build("moe", dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                  n_expert=6, top_k=2, expert_dim=32, shared_expert_dim=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_experts_are_their_dequantized_matrices_and_smaller(mode):
    """zoo.quantize quantizes each expert alone (per output row for int8, groups of 32 for int4): the quantized
    experts compute what the dequantized matrices compute, and take a quarter (int8) or under a sixth (int4,
    4 bits plus a bf16 scale and zero per 32 weights) of the float32 stacks' bytes."""
    from zoo.quantization import QuantExperts, quantize_tensor, weight_bytes
    model = tiny_moe()
    float_experts = model.model.layers[0].mlp.experts
    stacks = {n: getattr(float_experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    float_bytes = weight_bytes(float_experts)
    zoo.quantize(model, mode)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and isinstance(model.model.layers[0].mlp.gate, torch.nn.Linear)
    ratio = float_bytes / weight_bytes(experts)
    assert ratio > (3.7 if mode == "int8" else 6.3), ratio  # measured: int8 3.8, int4 6.4
    bits, group = (8, None) if mode == "int8" else (4, 32)
    deq = {}
    for name, w in stacks.items():  # the codes rounded as zoo.quantize rounds them (from the bf16 weights)
        qs = [quantize_tensor(m.bfloat16(), bits, group or m.shape[1]) for m in w]
        deq[name] = torch.stack([dataclasses.replace(q, scale=q.scale.bfloat16().float(),
                                                     zero=q.zero.bfloat16().float()).dequantize() for q in qs])
    ref = type(float_experts).__new__(type(float_experts))
    torch.nn.Module.__init__(ref)
    ref.gate_up_proj, ref.down_proj = torch.nn.Parameter(deq["gate_up_proj"]), torch.nn.Parameter(deq["down_proj"])
    x = torch.randn(10, 64).bfloat16()
    ids = torch.tensor([[0, 1], [1, 0], [2, 5], [5, 2], [0, 5], [1, 2], [0, 1], [2, 1], [5, 0], [0, 2]])
    weights = torch.rand(10, 2).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(experts(x, weights, ids).float(), ref(x.float(), weights.float(), ids),
                                   rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_moe_decodes_reading_only_its_experts(mode):
    """A quantized MoE decodes through the cache as it computes whole, a batch as its rows alone, and a decoding
    step reads the codes of the token's k experts only (the others' scales poisoned with NaN)."""
    model = zoo.quantize(tiny_moe(), mode)
    prompts = [tokens(B=1, T=9, seed=2)[0].tolist(), tokens(B=1, T=4, seed=3)[0].tolist()]
    both = zoo.generate(model, prompts, 6, temperature=0)
    assert both == [zoo.generate(model, p, 6, temperature=0)[0] for p in prompts]
    idx = tokens(B=1, T=12)
    with torch.no_grad():
        whole = model(idx).float()
        model.setup_cache(1, 16)
        model(idx[:, :-1], input_pos=torch.arange(11))
        model(idx)  # the whole pass again: each layer's picks for the last token
        for block in model.model.layers:
            picked = set(block.mlp.router_logits[-1].topk(2).indices.tolist())
            for e in set(range(6)) - picked:
                for m in (block.mlp.experts.gate_up_proj[e], block.mlp.experts.down_proj[e]):
                    (m.scales if hasattr(m, "scales") else m.weight).fill_(float("nan"))  # (its scales)
        step = model(idx[:, -1:], input_pos=torch.tensor([11])).float()
    torch.testing.assert_close(step[0, -1], whole[0, -1], rtol=0, atol=0.1)  # bf16 activations
    assert step.isfinite().all()


def test_native_gguf_keeps_quantized_experts_packed(tmp_path):
    """quantize='native' on a GGUF whose expert tensors are Q4_0 / Q8_0 keeps them packed, per expert, and computes
    (in float32) the dequantized model's logits; a stack in a float type stays a float stack."""
    from zoo.quantization import Int4Linear, Int8Linear, QuantExperts
    ref = hf_model("qwen2_moe-shared-dense", mlp_only_layers=[], moe_intermediate_size=32)
    idx = tokens()
    # gate and up of different widths (4-bit codes widened to 8 for the fused gate|up); down left in float32
    for types, packed in (({"gate": "Q4_0", "up": "Q8_0"}, ("gate_up_proj",)),):
        write_gguf(tmp_path / "m.gguf", ref, types)
        dequantized = zoo.from_pretrained(tmp_path / "m.gguf")
        native = zoo.from_pretrained(tmp_path / "m.gguf", quantize="native", dtype=torch.float32)
        experts = native.model.layers[0].mlp.experts
        assert isinstance(experts, QuantExperts)
        for name in ("gate_up_proj", "down_proj"):
            stack = getattr(experts, name)
            if name in packed:
                assert len(stack) == 6 and all(isinstance(m, (Int4Linear, Int8Linear)) for m in stack)
            else:
                assert isinstance(stack, torch.nn.Parameter) and stack.shape[0] == 6
        with torch.no_grad():
            assert (native(idx) - dequantized(idx)).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------ LoRA on experts

def test_lora_on_experts_round_trips_with_peft(tmp_path):
    """zoo.add_lora adapts the stacked experts (and the attention and shared-expert projections, not the routers);
    the adapter, saved in PEFT's layout (target_parameters), gives transformers + peft our logits, and PEFT's own
    adapter on the expert parameters gives the zoo PEFT's logits, adapted and merged."""
    peft = pytest.importorskip("peft")
    from zoo.lora import LoRAExperts
    hf_model("qwen2_moe-shared-dense").save_pretrained(tmp_path / "hf")
    model = zoo.add_lora(zoo.from_pretrained(tmp_path / "hf"), r=2, alpha=4)
    moe = model.model.layers[0].mlp
    assert isinstance(moe.experts, LoRAExperts) and isinstance(moe.gate, zoo.lora.Frozen)
    torch.manual_seed(3)
    with torch.no_grad():  # as if trained: B is zero at the start
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    idx = tokens()
    with torch.no_grad():
        ours = model(idx)
    zoo.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not write yet"):  # llama.cpp's adapter form: not silently dropped
        zoo.save_gguf_adapter(model, tmp_path / "adapter.gguf")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    theirs = peft.PeftModel.from_pretrained(hf_model("qwen2_moe-shared-dense"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (theirs(idx).logits - ours).abs().max().item() <= 1e-5
        assert (zoo.from_pretrained(tmp_path / "hf", adapter=tmp_path / "adapter")(idx) - ours).abs().max() == 0

    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                             target_parameters=["layers.0.mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    theirs = peft.get_peft_model(hf_model("qwen2_moe-shared-dense"), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    model = zoo.from_pretrained(tmp_path / "hf", adapter=tmp_path / "peft")
    assert model.model.layers[0].mlp.experts.stacks == ["gate_up_proj", "down_proj"]
    assert model.model.layers[2].mlp.experts.stacks == ["down_proj"]
    with torch.no_grad():
        want = theirs(idx).logits
        assert (model(idx) - want).abs().max().item() <= 1e-5
        assert (zoo.merge_lora(model)(idx) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8 base"])
def test_lora_on_experts_trains_the_adapters_alone(int8):
    """The experts' adapters get gradients (each expert's own; an unused expert's stay zero), the frozen experts
    none, over a float or an int8 base; dropout on experts is refused (PEFT's has none)."""
    model = tiny_moe()
    if int8:
        zoo.quantize(model, "int8", head=None, embeddings=None, dtype=torch.float32)
    zoo.add_lora(model, r=2, alpha=4, targets="gate_up_proj,down_proj")
    experts = model.model.layers[0].mlp.experts
    idx = tokens(B=1, T=3)
    model(idx).float().logsumexp(-1).mean().backward()
    used = model.model.layers[0].mlp.router_logits.topk(2).indices.unique()
    A = experts.lora_A["gate_up_proj"].grad  # [E, r, D]; B starts at zero, so A's gradient is zero too: see B
    B = experts.lora_B["down_proj"].grad  # [E, D, r]
    assert A is not None and (B[used].abs().sum(dim=(1, 2)) > 0).all()
    unused = [e for e in range(6) if e not in used.tolist()]
    assert unused and B[unused].abs().sum() == 0
    assert all(not p.requires_grad for p in experts.base.parameters())
    with pytest.raises(ValueError, match="LoRA dropout 0.1 on a mixture's experts"):
        zoo.add_lora(tiny_moe(), r=2, dropout=0.1)


# ------------------------------------------------------------------------------------------ compiled decoding

@pytest.mark.slow
def test_decode_step_compiles_without_a_graph_break(tmp_path):
    """Compiled, the experts gather each (token, expert) pair's weights (no .tolist(), no data-dependent shapes):
    the one-token decode step traces as one graph (fullgraph=True) and computes the eager step's logits. (Dynamo's
    trace alone, backend="eager": inductor's code generation took a minute here.)"""
    hf_model("olmoe-k2-norm").save_pretrained(tmp_path / "hf")
    model = zoo.from_pretrained(tmp_path / "hf")
    prompt = tokens(B=2, T=5)
    with torch.no_grad():
        model.setup_cache(2, 8)
        model(prompt, input_pos=torch.arange(5))
        eager = model(prompt[:, -1:], input_pos=torch.tensor([5]))
        model(prompt, input_pos=torch.arange(5))
        step = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        compiled = step(prompt[:, -1:], input_pos=torch.tensor([5]))
    assert (compiled - eager).abs().max().item() <= 1e-5
