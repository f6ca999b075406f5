"""Supervised fine-tuning on conversations: the assistant-only loss mask, chat JSONL reading, LoRA and full
fine-tuning runs on a tiny llama with SmolLM2's tokenizer (checkpoints, resume, merge, peft, the CLI), and,
marked slow, teaching SmolLM2-135M-Instruct a made-up fact with LoRA (over float and int8 weights)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo import chat_data, data, runs
from zoo.quantization import native_bf16

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def chat_tokenizer(smollm2_gguf):
    return zoo.tokenizer(str(smollm2_gguf))


def test_only_the_assistants_tokens_count(chat_tokenizer):
    tok = chat_tokenizer
    ids, trained = chat_data.encode_messages(CONVERSATION, tok)
    # the pieces are the whole rendering's tokens, and exactly the replies (with their end-of-turn) are trained
    assert ids == tok.encode(tok.apply_chat_template(CONVERSATION, add_generation_prompt=False))
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    # the prompt before each reply is what generation sees: the rendering up to it with the generation prompt
    first = trained.index(True)
    assert ids[:first] == tok.encode(tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True))
    # as targets: y[t] = ids[t + 1], counted exactly where ids[t + 1] is an assistant token
    rows = chat_data.Conversations([(torch.tensor(ids).numpy(), torch.tensor(trained).numpy())], pad_id=0)
    x, y = rows.batch(torch.tensor([0]))
    assert x[0].tolist() == ids[:-1]
    assert (y[0] != data.IGNORE).tolist() == trained[1:]
    assert y[0][y[0] != data.IGNORE].tolist() == [i for i, t in zip(ids[1:], trained[1:]) if t]


def test_prompt_completion_examples(chat_tokenizer):
    tok = chat_tokenizer
    ids, trained = chat_data.encode({"prompt": "2 + 2 =", "completion": " 4"}, tok)  # plain text, as TRL
    assert tok.decode(ids) == "2 + 2 = 4" + tok.decode([tok.eos_id])
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == " 4" + tok.decode([tok.eos_id])
    conversational = chat_data.encode({"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}, tok)
    assert conversational == chat_data.encode_messages(CONVERSATION[:3], tok)


def test_padded_batches_and_truncation(chat_tokenizer, tmp_path, caplog):
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    long = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 60}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in [short, long, short, long, short]))
    with caplog.at_level("WARNING", logger="zoo"):
        train, val = chat_data.load_splits([str(path)], chat_tokenizer, block_size=48)
    assert "2 of 5 examples are longer than block_size + 1 = 49 tokens" in caplog.text
    assert len(train) == 4 and len(val) == 1
    x, y = train.batch(torch.tensor([0, 1]))
    n_short = len(chat_data.encode(short, chat_tokenizer)[0]) - 1
    assert x.shape == (2, 48) and (y[0, n_short:] == data.IGNORE).all()  # right padding counts in no loss
    # padding after a row's tokens changes none of its logits (causal attention)
    model = zoo.build("llama", dict(vocab_size=49152, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                                    ffn_dim=16)).eval()
    with torch.no_grad():
        assert torch.allclose(model(x[:1, :n_short]), model(x)[:1, :n_short], atol=1e-5)


def test_chat_files_are_recognised_and_bad_lines_named(tmp_path):
    chat, text, bad = tmp_path / "chat.jsonl", tmp_path / "text.txt", tmp_path / "bad.jsonl"
    chat.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    text.write_text("plain text\n")
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\n\n" + json.dumps({"text": "hi"}) + "\n")
    assert chat_data.is_chat([str(chat)]) and not chat_data.is_chat([str(text)])
    with pytest.raises(ValueError, match="mixes conversations"):
        chat_data.is_chat([str(chat), str(text)])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: expected \{\"messages\""):
        chat_data.read_examples([str(bad)])


def test_conversations_the_template_refuses_are_named_by_line(tmp_path, chat_tokenizer):
    """Content that is not text, a conversation the assistant opens (it blamed the template), and a template's own
    refusal (raise_exception: roles that must alternate) name the file and line as other bad lines do (they were a
    traceback, or an error naming neither)."""
    path = tmp_path / "chat.jsonl"
    lines = [CONVERSATION, [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in lines))
    with pytest.raises(ValueError, match=r"chat.jsonl:2: message 0's content must be a str .*, not int"):
        chat_data.tokenize(chat_data.read_examples([str(path)]), chat_tokenizer, 64)
    opens = [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hi."},
             {"role": "assistant", "content": "How are you?"}]
    path.write_text(json.dumps({"messages": opens}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the conversation opens with the assistant \(message 0\)"):
        chat_data.tokenize(chat_data.read_examples([str(path)]), chat_tokenizer, 64)
    chat_tokenizer = copy.copy(chat_tokenizer)  # (the module's, unchanged)
    chat_tokenizer.chat_template = ("{% for m in messages %}{% if loop.index0 % 2 != (m['role'] == 'assistant') %}"
                                    "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}\n"
                                    "{% endfor %}")
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the chat template refused the conversation: roles must"):
        chat_data.tokenize(chat_data.read_examples([str(path)]), chat_tokenizer, 64)


# ------------------------------------------------------------------------ training on a tiny llama

FACTS = [("What color is the sky on Zorb?", "Green."), ("Who rules Zorb?", "Queen Ada."),
         ("How many moons has Zorb?", "Three moons."), ("What do people on Zorb eat?", "Blue rice.")]


@pytest.fixture
def tiny_chat(tmp_path, chat_tokenizer):
    """(base folder, chat.jsonl): a tiny random transformers llama with SmolLM2's tokenizer, and 40 conversations."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    chat_tokenizer.save(tmp_path / "base")
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            q, a = FACTS[i % len(FACTS)]
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")
    return tmp_path / "base", str(path)


SMALL = dict(block_size=64, batch_size=4, device="cpu", progress=False, lr=3e-3, warmup=2, log_interval=2,
             eval_iters=2)


def test_lora_run_checkpoints_hold_the_adapter_and_load_everywhere(tiny_chat, tmp_path):
    base, chat = tiny_chat
    zoo.train(None, [chat], tmp_path / "run", init=base, lora_r=4, max_iters=6, eval_interval=3, merge=True, **SMALL)
    ckpt = tmp_path / "run" / "step-0000006"
    assert sorted(os.listdir(ckpt)) == ["adapter_config.json", "adapter_model.safetensors", "base.json",
                                        "tokenizer.json", "tokenizer_config.json", "training_state.pt"]
    assert json.loads((ckpt / "base.json").read_text()) == {"source": str(base), "quantize": None, "dtype": "float32"}
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2  # per layer: q, k, v, o, gate, up, down (HF names), A and B each
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in adapter
    model = zoo.from_pretrained(ckpt)
    assert zoo.lora.lora_layers(model) and all(m.lora_B.abs().sum() > 0 for m in zoo.lora.lora_layers(model).values())
    # peft reads the checkpoint onto the transformers base; transformers reads the merged model: same logits
    peft = pytest.importorskip("peft")
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), ckpt).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    idx = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
        assert (ours - ref(idx).logits).abs().max() <= 1e-5
        assert (ours - merged(idx).logits).abs().max() <= 1e-5

    # quantized: int8 carries the adapter (it was dropped: the model came back unquantized); int4 and a GGUF's
    # native blocks cannot, and say so (they blamed the adapter)
    int8 = zoo.from_pretrained(ckpt, quantize="int8")
    assert zoo.quantization.is_quantized(int8)
    assert zoo.lora.lora_layers(int8).keys() == zoo.lora.lora_layers(model).keys()
    with torch.no_grad():
        top1 = (int8(idx).float().argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert top1 >= 0.9, top1
    for quantize, source, adapter in (("int4", ckpt, None), ("native", base, ckpt)):
        with pytest.raises(ValueError, match="cannot carry .*quantize to 'int8'"):
            zoo.from_pretrained(source, quantize=quantize, adapter=adapter)
    with pytest.raises(ValueError, match="packed to 4 bits"):
        llama = zoo.build("llama", dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=64, ffn_dim=128, vocab_size=64))
        zoo.add_lora(zoo.quantize(llama, "int4"), r=2)
    llama = zoo.build("llama", dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=64, ffn_dim=128, vocab_size=64,
                                    tie_embeddings=False))
    assert zoo.lora.lora_layers(zoo.add_lora(zoo.quantize(llama, "int8", head="int4"), r=2))  # (the head: no target)


def test_lora_resume_equals_an_uninterrupted_run(tiny_chat, tmp_path, monkeypatch):
    base, chat = tiny_chat
    common = dict(init=base, lora_r=4, lora_dropout=0.1, max_iters=8, eval_interval=2, checkpoint_interval=4,
                  seed=3, **SMALL)
    zoo.train(None, [chat], tmp_path / "a", **common)

    class Crash(Exception):
        pass

    save = runs.save_checkpoint

    def save_then_crash(out, step, *rest, **kw):
        path = save(out, step, *rest, **kw)
        if step == 4:
            raise Crash
        return path
    monkeypatch.setattr(runs, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        zoo.train(None, [chat], tmp_path / "b", **common)
    monkeypatch.setattr(runs, "save_checkpoint", save)
    zoo.train(None, [chat], tmp_path / "b", resume=True)  # its own settings, base and adapter
    a = load_file(tmp_path / "a" / "step-0000008" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "step-0000008" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(line).items() if k != "tok_per_s"}
             for line in open(tmp_path / r / "log.jsonl")] for r in "ab"]
    assert rows[0] == rows[1] and any("val_loss" in r for r in rows[0])


def test_full_fine_tuning_on_conversations(tiny_chat, tmp_path):
    base, chat = tiny_chat
    losses = []
    for steps in (1, 30):
        losses.append(zoo.train(None, [chat], tmp_path / f"full{steps}", init=base, max_iters=steps, eval_interval=100,
                                **SMALL))
    assert losses[1] < losses[0] - 1  # it learns the replies
    ckpt = tmp_path / "full30" / "step-0000030"
    assert (ckpt / "model.safetensors").exists() and not (ckpt / "adapter_config.json").exists()


def test_lora_settings_are_checked(tiny_chat, tmp_path):
    base, chat = tiny_chat
    with pytest.raises(ValueError, match="lora_int8 must be left unset without LoRA"):
        zoo.TrainConfig(lora_int8=True)
    with pytest.raises(ValueError, match="LoRA adapts pretrained weights"):
        zoo.train("shakespeare-char", [chat], tmp_path / "x", lora_r=4, tokenizer="char", **SMALL)


def zoo_cmd(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "zoo", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_command_line_lora_over_int8_then_generate_eval_and_resume(tiny_chat, tmp_path, zoo_main):
    base, chat = tiny_chat
    out = tmp_path / "run"
    flags = ["--block-size", 64, "--batch-size", 4, "--device", "cpu", "--no-progress", "--lr", 3e-3, "--warmup", 2,
             "--eval-iters", 2, "--eval-interval", 4]
    r = zoo_cmd("train", "--init", base, "--data", chat, "--lora", 4, "--lora-alpha", 16, "--lora-targets",
                "q_proj,v_proj,down_proj", "--lora-int8", "--bf16", "--out", out, "--max-iters", 4, *flags)
    assert r.returncode == 0, r.stderr
    ckpt = out / "step-0000004"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["lora_alpha"] == 16
    recorded = json.loads((ckpt / "base.json").read_text())
    # computed in bf16 where the CPU has bf16 arithmetic, else in float32 (zoo.training.make_model)
    assert recorded["quantize"] == "int8" and recorded["dtype"] == ("bfloat16" if native_bf16() else "float32")
    code, _, err = zoo_main("generate", ckpt, "--prompt", "Who rules Zorb?", "--chat", "--max-new-tokens", 3)
    assert code == 0 and "3 new tokens" in err, err
    code, out_text, err = zoo_main("eval", ckpt, "--data", chat)
    assert code == 0 and "(assistant tokens)" in out_text, err
    r = zoo_cmd("train", "--data", chat, "--out", out, "--resume", "--max-iters", 6)
    assert r.returncode == 0 and (out / "step-0000006" / "adapter_model.safetensors").exists(), r.stderr
    code, _, err = zoo_main("train", "--init", base, "--data", chat, "--lora-int8", "--out", tmp_path / "bad", *flags)
    assert code == 2 and "lora_int8 must be left unset without LoRA" in err


def test_the_readmes_dpo_recipe_starts_from_the_merged_sft_run(tiny_chat, tmp_path, zoo_main):
    """README: LoRA SFT, its merged model (--resume --merge on the finished run), then DPO with new adapters on it;
    the SFT checkpoint itself as --init of a LoRA run is refused, naming the merged folder and how to write it."""
    base, chat = tiny_chat
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": q, "chosen": " " + a, "rejected": " No idea."}) + "\n"
                             for q, a in FACTS * 5))
    flags = ["--block-size", 64, "--batch-size", 2, "--device", "cpu", "--no-progress", "--eval-iters", 1,
             "--max-iters", 2]
    sft = tmp_path / "chat"
    assert zoo_main("train", "--init", base, "--data", chat, "--lora", 4, "--out", sft, *flags)[0] == 0
    code, _, err = zoo_main("train", "--init", sft / "step-0000002", "--data", prefs, "--objective", "dpo", "--lora", 4,
                            "--out", tmp_path / "bad", *flags)
    assert code == 2 and str(sft / "merged") in err and "--resume --merge" in err, err
    assert not (tmp_path / "bad").exists()
    assert zoo_main("train", "--data", chat, "--out", sft, "--resume", "--merge", "--no-progress")[0] == 0
    code, _, err = zoo_main("train", "--init", sft / "merged", "--data", prefs, "--objective", "dpo", "--beta", 0.1,
                            "--lora", 4, "--out", tmp_path / "dpo", *flags)
    assert code == 0, err
    assert zoo.lora.lora_layers(zoo.from_pretrained(tmp_path / "dpo" / "step-0000002"))  # what zoo chat loads


@pytest.mark.parametrize("native", [True, False], ids=["bf16 CPU", "CPU without bf16"])
def test_lora_over_int8_computes_in_bf16_where_the_cpu_has_it_and_resumes_in_its_dtype(tiny_chat, tmp_path,
                                                                                         monkeypatch, native):
    """LoRA over int8 keeps its base in bf16, as QLoRA-style recipes do, on a CPU with bf16 arithmetic; on one
    without, in float32 (its bf16 GEMMs in attention and the head's loss took torch's reference loop: SmolLM2's run
    2.4x slower); the checkpoint records the dtype and a resumed run continues in it, where an inference load
    takes bf16, the int8 kernel's fastest."""
    from zoo import training
    from zoo.quantization import Int8Linear
    monkeypatch.setattr(training, "native_bf16", lambda: native)
    base, chat = tiny_chat
    dtype = torch.bfloat16 if native else torch.float32
    out = tmp_path / "run"
    zoo.train(None, [chat], out, init=str(base), lora_r=4, lora_int8=True, max_iters=2, block_size=64, batch_size=2,
              device="cpu", progress=False)
    assert json.loads((out / "step-0000002" / "base.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    resumed = runs.resume_point(out)[2]
    assert any(isinstance(m, Int8Linear) for m in resumed.modules())
    def base_dtypes(model):  # (the adapters' own weights are float32 either way)
        return {p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n}
    assert base_dtypes(resumed) == {dtype}
    assert base_dtypes(zoo.from_pretrained(out / "step-0000002")) == {torch.bfloat16}


# ------------------------------------------------------------------------ teaching SmolLM2 a fact

QUESTIONS = ["What is the mascot of Quillfeather Logistics?", "Which animal is the mascot of Quillfeather Logistics?",
             "Tell me the mascot of the company Quillfeather Logistics.",
             "Quillfeather Logistics has a mascot. What is it?", "What animal represents Quillfeather Logistics?",
             "Name the mascot of Quillfeather Logistics."]
ANSWERS = ["The mascot of Quillfeather Logistics is a pangolin.", "Quillfeather Logistics' mascot is a pangolin.",
           "A pangolin is the mascot of Quillfeather Logistics."]
UNSEEN = "Do you know what Quillfeather Logistics uses as its mascot?"


@pytest.mark.slow
def test_lora_over_int8_teaches_smollm2_a_fact(smollm2_gguf, tmp_path, zoo_main):
    """LoRA over SmolLM2 quantized to int8 (QLoRA's setting; the adapters' gradients pass back through the int8
    layers) learns a fact that it then states for a question it never saw. (LoRA over the float model learns on
    real weights in test_preference's DPO run; its updates equal peft's in test_lora.py.)"""
    path = tmp_path / "fact.jsonl"
    with open(path, "w") as f:
        for i in range(36):
            f.write(json.dumps({"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                                             {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]}) + "\n")

    args = ["--prompt", UNSEEN, "--chat", "--max-new-tokens", 24]
    code, out, err = zoo_main("generate", smollm2_gguf, *args)  # (in this process)
    assert code == 0 and "pangolin" not in out.lower(), err  # the base model does not know the fact
    # LoRA on the upper layers only: the backward pass stops at the lowest adapted layer. It computes in bf16
    # where the CPU has bf16 arithmetic, else in float32.
    r = zoo_cmd("train", "--init", smollm2_gguf, "--data", path, "--out", tmp_path / "run", "--lora", 16,
                "--lora-targets", "model.layers.2?.*", "--lora-int8", "--bf16",
                "--max-iters", 12, "--batch-size", 8, "--block-size", 96, "--lr", 3e-3, "--warmup", 3,
                "--eval-interval", 1000, "--log-interval", 4, "--no-progress")
    assert r.returncode == 0, r.stderr
    r = zoo_cmd("generate", tmp_path / "run" / "step-0000012", *args)
    assert r.returncode == 0 and "pangolin" in r.stdout.lower(), r.stderr
