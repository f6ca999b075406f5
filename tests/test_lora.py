"""LoRA: the layer (merged = unmerged logits, the paper's initialisation, only adapters train), targets
(ours and the checkpoint's projection names), adapters over a frozen int8 base, and PEFT round trips
both ways on tiny random transformers models (gpt2; llama with GQA and a tied head)."""
import json
import math

import pytest
import torch

from conftest import tiny as tiny_model
import zoo
from zoo import adapters, lora, training

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 97
TINY = {  # zoo arch -> config of a small model with every kind of projection
    "gpt2": dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16),
    "llama": dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_dim=24,
                  tie_embeddings=True),
    "mqa": dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=16, ffn_dim=24),
    "scratchformer": dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16, ffn_dim=24),
    "gemma": dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=6, ffn_dim=24,
                  sliding_window=5, layer_types=["sliding_attention", "full_attention"], sandwich_norms=True,
                  qk_norm=True, rope_local_theta=1e4),
}
HF = {  # name -> (transformers class, config class, config)
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=24, n_layer=2, n_head=3, n_positions=32)),
    "llama-gqa-tied": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=32, tie_word_embeddings=True)),
    "llama-gqa": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=32, tie_word_embeddings=False)),
    # Llama's relatives: q/k/v biases (Qwen2), per-head q/k norms (Qwen3), Phi-3's fused projections
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, max_position_embeddings=32, tie_word_embeddings=True)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32, partial_rotary_factor=0.5, pad_token_id=None)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=6, max_position_embeddings=32, sliding_window=5, layer_types=["sliding_attention", "full_attention"])),
}
# PEFT's usual targets for each: every projection, and (llama) the q, v-only adapters of PEFT's default
PEFT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama-gqa-tied": ["q_proj", "k_proj", "v_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"], "llama-gqa": ["q_proj", "v_proj", "up_proj"],
                "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "qwen3": ["q_proj", "v_proj", "down_proj"], "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def tiny(arch, seed=0):
    torch.manual_seed(seed)
    return zoo.build(arch, TINY[arch]).eval()


def randomize_adapters(model, seed=1):
    """B is zero after add_lora (the adapters change nothing yet): give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tokens(T=20, seed=2):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def hf_model(name, seed=0):
    cls, config_cls, kwargs = HF[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=V, bos_token_id=0, eos_token_id=0, **kwargs)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("arch", TINY)
def test_adapters_start_at_zero_then_merge_to_the_same_logits(arch):
    model = tiny(arch)
    idx = tokens()
    with torch.no_grad():
        base = model(idx)
        zoo.add_lora(model, r=4, alpha=8)
        assert torch.equal(model(idx), base)  # B = 0: training starts from the base model exactly
        randomize_adapters(model)
        adapted = model(idx)
        assert (adapted - base).abs().max() > 1e-2  # the adapters do change the output
        merged = zoo.merge_lora(model)
        assert not lora.lora_layers(merged) and not any("lora_" in n for n, _ in merged.named_parameters())
        assert (merged(idx) - adapted).abs().max() <= 1e-5


def test_fused_projections_get_one_adapter_per_checkpoint_projection():
    model = zoo.add_lora(tiny("llama"), r=4)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.slices == [32, 16, 16] and qkv.lora_A.shape == (12, 32) and qkv.lora_B.shape == (64, 4)
    B = randomize_adapters(model).model.layers[0].self_attn.qkv_proj.delta_B()
    # q's rows see only q's r columns of A, k's only k's, v's only v's: three independent LoRAs
    assert B[:32, 4:].abs().sum() == 0 and B[32:48, :4].abs().sum() == 0 and B[32:48, 8:].abs().sum() == 0
    assert B[48:, :8].abs().sum() == 0 and B[:32, :4].abs().sum() > 0
    assert model.model.layers[0].mlp.gate_up_proj.slices == [24, 24]


def test_initialisation_follows_the_paper():
    model = zoo.add_lora(tiny("llama"), r=8)
    layer = model.model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(layer.in_features)  # Kaiming-uniform with a = sqrt(5), as nn.Linear (and PEFT)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert layer.scaling == 16 / 8


def test_only_adapters_require_grad_and_reach_the_optimizer():
    model = zoo.add_lora(tiny("llama"), r=4, dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # qkv, o, gate_up, down in each of 2 layers
    optimizer = training.make_optimizer(model, zoo.TrainConfig(), "cpu")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    model.train()
    for _ in range(2):
        idx = tokens(seed=3)
        torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in frozen.items())
    assert model.model.layers[0].self_attn.qkv_proj.lora_B.abs().sum() > 0  # the lowest adapters learned too


def test_targets_name_our_layers_or_the_checkpoints_projections():
    model = zoo.add_lora(tiny("llama"), r=2, targets="q_proj,v_proj")  # parts of the fused qkv_proj
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert qkv.adapted == [True, False, True] and qkv.lora_A.shape == (4, 32)
    assert set(lora.lora_layers(model)) == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)}
    model = zoo.add_lora(tiny("llama"), r=2, targets=["model.layers.1.*"])
    assert set(lora.lora_layers(model)) == {f"model.layers.1.{n}" for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                            "mlp.gate_up_proj", "mlp.down_proj")}
    with pytest.raises(ValueError, match="no linear layer matches.*qkv_proj"):
        zoo.add_lora(tiny("llama"), targets=["query"])
    with pytest.raises(ValueError, match="experts' stacks: mlp.experts.gate_up_proj, mlp.experts.down_proj"):
        zoo.add_lora(tiny_model("moe"), targets=["query"])  # (the stacks, which targets can name, were not listed)
    with pytest.raises(ValueError, match="tied"):
        zoo.add_lora(tiny("llama"), targets=["lm_head"])
    with pytest.raises(ValueError, match="already has an adapter"):
        zoo.add_lora(zoo.add_lora(tiny("llama")))


def test_lora_over_int8_keeps_the_base_int8_and_frozen():
    model = adapters.quantize_int8(tiny("llama"))
    zoo.add_lora(model, r=4)
    state = model.state_dict()
    # the base matrices are int8 codes (plus a scale per row); no float copy of them anywhere
    assert all(state[n].dtype == torch.int8 for n in state if n.endswith(".codes"))
    linear_shapes = {tuple(lora.lora_layers(model)[n].base.codes.shape) for n in lora.lora_layers(model)}
    assert not [n for n, t in state.items() if t.is_floating_point() and tuple(t.shape) in linear_shapes]
    assert all(p.dtype != torch.float32 for n, p in model.named_parameters() if "lora_" not in n)
    before = {n: t.clone() for n, t in state.items() if "lora_" not in n}
    optimizer = training.make_optimizer(model, zoo.TrainConfig(), "cpu")
    model.train()
    for _ in range(3):
        idx = tokens(seed=4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in before.items())
    assert all(m.lora_B.abs().sum() > 0 for m in lora.lora_layers(model).values())  # gradients reached every layer
    with torch.no_grad():
        unmerged = model(tokens())
        merged = zoo.merge_lora(model)(tokens())
    assert (merged.float() - unmerged.float()).abs().max() <= 0.05 * unmerged.float().abs().max()  # bf16 matmuls



def test_lora_over_int8_with_activation_checkpointing_gives_the_same_gradients():
    """QLoRA's recipe recomputes each block in the backward pass (what keeps its memory low); the adapters'
    gradients must not change, the int8 layers' own backward included."""
    from zoo.distributed import checkpoint_blocks
    grads = []
    for ckpt in (False, True):
        model = randomize_adapters(zoo.add_lora(adapters.quantize_int8(tiny("llama")), r=4))
        if ckpt:
            checkpoint_blocks(model)
        model.train()
        idx = tokens(seed=4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 4  # 2 layers x (qkv, o, gate|up, down)
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)


@pytest.fixture
def hf_base(request, tmp_path):
    model = hf_model(request.param)
    model.save_pretrained(tmp_path / "base")
    return request.param, model, tmp_path / "base"


@pytest.mark.parametrize("hf_base", list(HF), indirect=True)
def test_zoo_adapter_loads_in_peft_with_the_same_logits(hf_base, tmp_path):
    name, ref, folder = hf_base
    model = randomize_adapters(zoo.add_lora(zoo.from_pretrained(folder), r=4, alpha=8))
    zoo.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    idx = tokens()
    with torch.no_grad():
        ours, theirs = model(idx), peft_model(idx).logits
        with peft_model.disable_adapter():
            assert (peft_model(idx).logits - theirs).abs().max() > 1e-2  # peft did load the adapter
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("hf_base", list(HF), indirect=True)
def test_peft_adapter_loads_in_zoo_with_the_same_logits(hf_base, tmp_path):
    name, ref, folder = hf_base
    torch.manual_seed(3)  # init_lora_weights=False: B random too, so the adapter changes the logits
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=PEFT_TARGETS[name], init_lora_weights=False,
                             use_rslora=name == "llama-gqa", task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(ref, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model = zoo.from_pretrained(folder, adapter=tmp_path / "adapter")
    idx = tokens()
    with torch.no_grad():
        assert (model(idx) - peft_model(idx).logits).abs().max() <= 1e-5
        unmerged = model(idx)
        assert (zoo.merge_lora(model)(idx) - unmerged).abs().max() <= 1e-5


def test_a_peft_adapter_on_some_layers_loads_in_zoo_with_the_same_logits(tmp_path):
    """layers_to_transform: PEFT adapts the layers it lists alone, and its file holds their matrices alone."""
    ref = hf_model("llama-gqa")
    ref.save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(ref, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model = zoo.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert sorted(lora.lora_layers(model)) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.qkv_proj"]
    idx = tokens()
    with torch.no_grad():
        theirs = peft_model(idx).logits
        with peft_model.disable_adapter():
            assert (peft_model(idx).logits - theirs).abs().max() > 1e-2
        assert (model(idx) - theirs).abs().max() <= 1e-5


def test_unsupported_adapters_are_clear_errors(tmp_path):
    ref = hf_model("llama-gqa")
    ref.save_pretrained(tmp_path / "base")
    peft.get_peft_model(ref, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        zoo.from_pretrained(tmp_path / "base", adapter=tmp_path / "dora")
    other = hf_model("llama-gqa-tied")
    peft.get_peft_model(other, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="lora_A"):  # another model's shapes
        zoo.from_pretrained(tmp_path / "base", adapter=tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        zoo.from_pretrained(tmp_path / "base", adapter=tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        zoo.save_adapter(zoo.from_pretrained(tmp_path / "base"), tmp_path / "none")


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16 layer", "float32 layer under bf16 autocast"])
def test_frozen_layers_compute_bf16_on_float32_units_where_the_cpu_lacks_bf16(autocast, monkeypatch):
    """A frozen layer computing in bf16 (a LoRA run's bf16 base, or under bf16 autocast) on a CPU without bf16
    arithmetic multiplies the bf16-rounded operands by float32 GEMMs (torch's own bf16 GEMM is emulated there, and
    on an AVX2-only CPU is its reference loop): the bf16 products, forward and backward; a bf16 CPU keeps torch's."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40).to(torch.float32 if autocast else torch.bfloat16).requires_grad_(False)
    x = torch.randn(5, 48, dtype=torch.bfloat16, requires_grad=True)
    w, b = base.weight.bfloat16().float(), base.bias.bfloat16().float()
    want = torch.nn.functional.linear(x.detach().float(), w, b).bfloat16()  # the exact products, summed in float32
    calls = []
    monkeypatch.setattr(lora._Widened, "apply", lambda *a, f=lora._Widened.apply: calls.append(1) or f(*a))
    for native in (False, True):
        monkeypatch.setattr(lora, "native_bf16", lambda: native)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = lora.Frozen(base)(x)
        assert len(calls) == 1 and y.dtype == torch.bfloat16  # (once: on the CPU without bf16)
        torch.testing.assert_close(y, want, rtol=1.6e-2, atol=1e-3)  # torch's bf16 GEMM: its own summation order
        if not native:
            assert torch.equal(y, want)
            g = torch.randn(5, 40, dtype=torch.bfloat16)
            y.backward(g)
            assert torch.equal(x.grad, (g.float() @ w).bfloat16())
