"""zoo/prepack.py: bfloat16 Linear layers over oneDNN's reordered weights give the plain layers' products bit for bit,
in a forward pass, in greedy decoding and in the engine's batches, for every architecture."""
import copy

import pytest
import torch

import zoo
from zoo.engine import Engine
from zoo.sampling import SamplingConfig
from zoo.tokenizers import CharTokenizer
from zoo.models.moe import Experts
from zoo.prepack import PrepackedExperts, PrepackedLinear, can_prepack, prepack

from conftest import TINY, tiny

pytestmark = pytest.mark.skipif(not can_prepack(torch.bfloat16, "cpu"), reason="oneDNN (mkldnn) is not available")
ARCHS = [name for name, (arch, _) in TINY.items() if arch != "bigram"]


def bf16(name):
    """TINY[name] in bfloat16, with random biases (tiny's are zeros, which would hide a dropped bias)."""
    model = tiny(name, std=0.3)
    torch.manual_seed(1)
    for key, p in model.named_parameters():
        if key.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("name", ARCHS)
def test_prepacked_model_computes_the_same_logits_and_tokens(name):
    plain, packed = bf16(name), prepack(bf16(name))
    assert any(isinstance(m, PrepackedLinear) for m in packed.modules())
    assert not any(type(m) in (torch.nn.Linear, Experts) for m in packed.modules())
    assert any(isinstance(m, PrepackedExperts) for m in packed.modules()) == (TINY[name][0] == "moe")
    idx = torch.randint(0, 37, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(idx), plain(idx))
        assert torch.equal(packed(idx[:, -1:]), plain(idx[:, -1:]))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert zoo.generate(packed, prompts, 12, temperature=0) == zoo.generate(plain, prompts, 12, temperature=0)


def test_prepacked_engine_decodes_as_the_plain_one():
    """The engine's batches (rows joining a running batch, prefills alone) through both models, request for request."""
    chars = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,!?ABCDEF")  # 37 characters: the tiny vocab
    greedy = SamplingConfig(temperature=0, eos_token_id=[])
    prompts, steps = [[5, 9, 1, 30, 2, 7, 7], [3, 11, 4], [20, 1, 8, 36, 0], [2]], [14, 20, 5, 25]
    answers = []
    for model in (prepack(bf16("gpt2")), bf16("gpt2")):
        engine = Engine(model, chars, max_batch=3)
        requests = [engine.submit(prompts[0], steps[0], greedy)]
        engine.step()
        requests += [engine.submit(p, n, greedy) for p, n in zip(prompts[1:], steps[1:])]
        while engine.step():
            pass
        answers.append([r.tokens for r in requests])
    packed, plain = answers
    assert packed == plain
    assert [len(a) for a in packed] == steps


def test_prepack_leaves_what_it_cannot_help():
    fp32 = tiny("llama-gqa")
    assert not any(isinstance(m, PrepackedLinear) for m in prepack(fp32).modules())
    tied = prepack(tiny("llama-gqa").to(torch.bfloat16))  # tie_embeddings: the head gets its own reordered copy
    assert isinstance(tied.lm_head, PrepackedLinear) and type(tied.model.embed_tokens.weight) is torch.nn.Parameter


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, gpt2_bpe):
    """A tiny GPT-2 saved with GPT-2's tokenizer: (folder, the model, the tokenizer)."""
    torch.manual_seed(0)
    model, tok = zoo.build("gpt2", dict(n_layer=1, n_head=2, n_embd=16, block_size=32)), zoo.tokenizer("gpt2")
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    zoo.save_pretrained(model, folder, tokenizer=tok)
    return folder, model, tok


def prepacked_by(monkeypatch, command):
    """The models a command module's prepack call packs, recorded (the call itself unchanged)."""
    seen = []
    monkeypatch.setattr(command, "prepack", lambda model: seen.append(prepack(model)) or model)
    return seen


def test_zoo_generate_and_serve_run_bf16_models_prepacked(tiny_folder, monkeypatch, capsys):
    """`zoo generate` in bf16 prepacks its model and writes the plain bf16 model's greedy text; `zoo serve` prepacks
    the model it serves, except with --compile (whose step cannot trace the reordered weights)."""
    import uvicorn
    from zoo.cli import main
    from zoo.commands import generate, serve

    folder, model, tok = tiny_folder
    seen = prepacked_by(monkeypatch, generate)
    assert main(["generate", str(folder), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0",
                 "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert len(seen) == 1 and any(isinstance(m, PrepackedLinear) for m in seen[0].modules())
    plain = copy.deepcopy(model).to(torch.bfloat16).eval()
    assert capsys.readouterr().out == zoo.complete(plain, tok, "Hello", max_new_tokens=12, temperature=0) + "\n"

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)  # the app is built, never served
    seen = prepacked_by(monkeypatch, serve)
    assert main(["serve", str(folder), "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert len(seen) == 1 and any(isinstance(m, PrepackedLinear) for m in seen[0].modules())
    assert main(["serve", str(folder), "--dtype", "bfloat16", "--device", "cpu", "--compile"]) == 0
    assert len(seen) == 1
