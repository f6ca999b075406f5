"""Preference tuning (zoo/preference.py): pairs as batches, the DPO/cDPO/IPO losses and their gradients against
TRL's DPOTrainer on the same inputs, and `zoo train --objective dpo` end to end."""
import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo import preference
from zoo import runs
from zoo.data import IGNORE

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

PROMPTS = ["What colour is the sea?", "Name a fruit.", "Describe your morning in a few words, please."]


def pair(i, conversational=True):
    q = PROMPTS[i % len(PROMPTS)]
    good, bad = f"It is blue, like answer {i}.", "I do not know."
    if not conversational:
        return {"prompt": q, "chosen": " " + good, "rejected": " " + bad}
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}]}


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def chat_tokenizer(smollm2_gguf):
    return zoo.tokenizer(str(smollm2_gguf))


@pytest.fixture
def tiny_base(tmp_path, chat_tokenizer):
    """A tiny random transformers llama with SmolLM2's tokenizer, saved to a folder."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    chat_tokenizer.save(tmp_path / "base")
    return tmp_path / "base"


# ------------------------------------------------------------------------------------- data

def test_only_the_answers_count_and_pairs_batch_chosen_then_rejected(chat_tokenizer):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Colour?"}]
    row = {"prompt": history, "chosen": [{"role": "assistant", "content": "Blue."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    (ids_c, ans_c), (ids_r, ans_r) = preference.encode_pair(row, chat_tokenizer)
    # the answer: its text and end-of-turn token, not the earlier assistant turn of the prompt
    assert chat_tokenizer.decode([t for t, a in zip(ids_c, ans_c) if a]) == "Blue.<|im_end|>"
    assert chat_tokenizer.decode([t for t, a in zip(ids_r, ans_r) if a]) == "No.<|im_end|>"
    full = chat_tokenizer.apply_chat_template(history + row["chosen"], add_generation_prompt=False)
    assert chat_tokenizer.decode(ids_c) == full
    (ids, ans), _ = preference.encode_pair(pair(0, conversational=False), chat_tokenizer)
    assert chat_tokenizer.decode([t for t, a in zip(ids, ans) if a]) == " It is blue, like answer 0.<|im_end|>"  # the eos

    pairs = preference.Pairs(preference.tokenize([("x", pair(i)) for i in range(3)], chat_tokenizer, 256), 0)
    x, t = pairs.batch(torch.tensor([2, 0]))
    assert x.shape[0] == 4 and t.ref is None
    answers = [chat_tokenizer.decode(t.y[r][t.y[r] != IGNORE].tolist()) for r in range(4)]
    assert answers == ["It is blue, like answer 2.<|im_end|>", "It is blue, like answer 0.<|im_end|>",
                       "I do not know.<|im_end|>", "I do not know.<|im_end|>"]


def test_long_sequences_lose_their_prompts_start_and_are_counted(chat_tokenizer, caplog):
    long = {"prompt": "word " * 80, "chosen": " yes", "rejected": " no " * 40}
    with caplog.at_level("WARNING", logger="zoo"):
        (c_ids, c_ans, r_ids, r_ans), = preference.tokenize([("f:1", long)], chat_tokenizer, 31)
    assert len(c_ids) == len(r_ids) == 32
    assert chat_tokenizer.decode(c_ids[c_ans].tolist()) == " yes<|im_end|>"  # the whole short answer
    assert r_ans[1:].all() and not r_ans[0]  # the long answer: one token of prompt, then its beginning
    assert "2 were longer than block_size + 1 = 32 tokens" in caplog.text and "1 of them also" in caplog.text


def test_bad_rows_are_named(tmp_path, chat_tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(pair(0)) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    assert preference.is_preference([str(path)])
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected \{\"prompt\""):
        preference.load_splits([str(path)], chat_tokenizer)
    path.write_text(json.dumps({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}],
                                "rejected": "c"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: prompt, chosen and rejected must all be strings"):
        preference.load_splits([str(path)], chat_tokenizer)


# ------------------------------------------------------------------------------------- against TRL

def trl_trainer(model, ref_model, tokenizer_folder, tmp_path, loss_type, beta):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[],
                         use_cpu=True, per_device_train_batch_size=2, logging_steps=1, save_strategy="no")
    data = datasets.Dataset.from_list([pair(i, conversational=False) for i in range(4)])
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)


def trl_inputs(pairs, index):
    """TRL's batch (input_ids, attention_mask, completion_mask; chosen rows, then rejected) for zoo's pairs."""
    rows = [pairs.examples[i] for i in index.tolist()] + [pairs.examples[i + pairs.n] for i in index.tolist()]
    L = max(len(ids) for ids, _ in rows)
    out = {k: torch.zeros(len(rows), L, dtype=torch.long) for k in ("input_ids", "attention_mask", "completion_mask")}
    for b, (ids, answer) in enumerate(rows):
        out["input_ids"][b, :len(ids)] = torch.from_numpy(ids)
        out["attention_mask"][b, :len(ids)] = 1
        out["completion_mask"][b, :len(ids)] = torch.from_numpy(answer).long()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_loss_rewards_and_gradients_equal_trls(tiny_base, tmp_path, chat_tokenizer, use_lora):
    """The same model, reference and batch of pairs: zoo's DPO (sigmoid) and IPO losses, rewards and
    trainable parameters' gradients are TRL DPOTrainer's (float32)."""
    beta = 0.3
    ours = zoo.from_pretrained(tiny_base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_base)
    if use_lora:
        peft = pytest.importorskip("peft")
        zoo.add_lora(ours, r=4, alpha=8)
        torch.manual_seed(1)
        for m in zoo.lora.lora_layers(ours).values():  # B = 0 would make the policy the reference
            torch.nn.init.normal_(m.lora_B, std=0.05)
        zoo.save_adapter(ours, tmp_path / "adapter")
        hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
        ref_model = None
    else:
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_base)
        with torch.no_grad():  # a policy that differs from the reference
            for p in hf.parameters():
                p.add_(0.02 * torch.randn_like(p))
        ours.load_state_dict(zoo.from_pretrained(_saved(hf, tmp_path)).state_dict())
    trainer = trl_trainer(hf, ref_model, tiny_base, tmp_path, "sigmoid", beta)
    trainer.model.train()
    ours.train()

    pairs = preference.Pairs(preference.tokenize([("x", pair(i, conversational=i % 2 == 0)) for i in range(3)],
                                                 chat_tokenizer, 127), 0)
    index = torch.tensor([0, 1, 2])
    x, targets = pairs.batch(index)
    reference = preference.Reference(ours if use_lora else zoo.from_pretrained(tiny_base))  # the unchanged base
    inputs = trl_inputs(pairs, index)
    # the reference log-probabilities: the unchanged base's, through TRL's reference forward (for LoRA the peft
    # model with its adapters off: TRL itself would take the loaded adapter as the reference) agree to rounding
    # (its no-grad output layer sums in another order); both sides then take the same ones, as the loss's inputs
    with torch.no_grad(), (hf.disable_adapter() if use_lora else contextlib.nullcontext()):
        ref = reference(x, targets.y)
        model_inputs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        theirs = (trainer.ref_model or trainer.model)(**model_inputs, labels=labels, fused_lm_head=True)
    assert (theirs.log_probs.sum(1) - ref).abs().max() <= 2e-3  # of sums near -100
    inputs.update(ref_chosen_logps=ref.chunk(2)[0], ref_rejected_logps=ref.chunk(2)[1])
    trainer.precompute_ref_logps = True

    for loss_type in preference.LOSSES:
        trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
        loss_of = preference.DPOLoss(ours, reference, beta, loss=loss_type)
        loss = loss_of(ours, x, preference.Targets(targets.y, ref))
        loss.backward()
        metrics = loss_of.metrics.read()
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        theirs.backward()
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        assert abs(loss.item() - theirs.item()) <= 1e-5, loss_type
        for ours_name, trl_name in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                                    ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies"),
                                    ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
            assert metrics[ours_name] == pytest.approx(logged[trl_name], abs=1e-4), ours_name

        # gradients, by the checkpoint's names: zoo's written out as a model (or an adapter) whose weights they are
        grads = copy.deepcopy(ours)
        for g, p in zip(grads.parameters(), ours.parameters()):
            g.data = p.grad if p.grad is not None else torch.zeros_like(p)
        if use_lora:
            zoo.save_adapter(grads, tmp_path / loss_type)
            ours_g = load_file(tmp_path / loss_type / "adapter_model.safetensors")
            theirs_g = {n.replace(".default", ""): p.grad for n, p in hf.named_parameters() if p.requires_grad}
        else:
            zoo.save_pretrained(grads, tmp_path / loss_type)
            ours_g = load_file(tmp_path / loss_type / "model.safetensors")
            theirs_g = {n: p.grad for n, p in hf.named_parameters()}
        assert set(ours_g) == set(theirs_g) and len(ours_g) > 10
        worst = max((ours_g[n] - theirs_g[n]).abs().max().item() for n in ours_g)
        assert worst <= 1e-5, (loss_type, worst)
        assert max(g.abs().max().item() for g in ours_g.values()) > 1e-3  # gradients that say something
        ours.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)


def _saved(hf, tmp_path):
    hf.save_pretrained(tmp_path / "policy")
    return tmp_path / "policy"


def test_cdpo_is_the_label_flip_mixture():
    """cDPO (label smoothing eps): the expected DPO loss when each pair's labels are flipped with chance eps."""
    logps, ref = torch.tensor([-3.0, -5.0, -4.0, -2.0]), torch.tensor([-3.5, -4.0, -4.5, -3.0])
    counts = torch.tensor([2, 3, 4, 5])
    eps, beta = 0.2, 0.5
    smoothed, _, _ = preference.dpo_loss(logps, ref, counts, beta, eps)
    plain, cr, rr = preference.dpo_loss(logps, ref, counts, beta)
    flipped, _, _ = preference.dpo_loss(torch.cat(logps.chunk(2)[::-1]), torch.cat(ref.chunk(2)[::-1]), counts, beta)
    torch.testing.assert_close(smoothed, (1 - eps) * plain + eps * flipped)
    torch.testing.assert_close(cr, beta * (logps - ref)[:2])


# ------------------------------------------------------------------------------------- training runs

SMALL = dict(block_size=48, batch_size=2, device="cpu", progress=False, lr=3e-3, warmup=2, log_interval=2,
             eval_iters=1)


@pytest.fixture
def prefs(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(pair(i, conversational=i % 3 != 0)) + "\n" for i in range(30)))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("lora_r,reference", [(0, "live"), (4, "live"), (0, "precomputed")],
                         ids=["full-copy", "lora-adapters-off", "full-precomputed"])
def test_dpo_runs_log_the_metrics_and_resume_exactly(tiny_base, prefs, tmp_path, monkeypatch, reference, lora_r):
    common = dict(init=tiny_base, objective="dpo", beta=0.5, lora_r=lora_r, dpo_reference=reference, max_iters=4,
                  eval_interval=2, checkpoint_interval=2, seed=3, **SMALL)
    zoo.train(None, [prefs], tmp_path / "a", **common)
    rows = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    train_rows, val_rows = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    assert set(train_rows[0]) == {"step", "loss", "lr", "tok_per_s", "reward_margin", "reward_accuracy",
                                  "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected"}
    assert [r["step"] for r in val_rows] == [2, 4] and "val_reward_accuracy" in val_rows[0]
    assert val_rows[-1]["val_reward_margin"] > 0  # it learns to prefer the chosen answers
    ckpt = tmp_path / "a" / "step-0000004"
    assert (ckpt / ("adapter_model.safetensors" if lora_r else "model.safetensors")).exists()

    class Crash(Exception):
        pass

    save = runs.save_checkpoint

    def save_then_crash(out, step, *rest, **kw):
        path = save(out, step, *rest, **kw)
        if step == 2:
            raise Crash
        return path
    monkeypatch.setattr(runs, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        zoo.train(None, [prefs], tmp_path / "b", **common)
    monkeypatch.setattr(runs, "save_checkpoint", save)
    zoo.train(None, [prefs], tmp_path / "b", resume=True)  # its own settings, base and reference
    name = "adapter_model.safetensors" if lora_r else "model.safetensors"
    a, b = (load_file(tmp_path / r / "step-0000004" / name) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "tok_per_s"}
             for line in open(tmp_path / r / "log.jsonl")] for r in "ab"]
    assert logs[0] == logs[1]


def test_dpo_settings_and_data_are_checked(tiny_base, prefs, tmp_path):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\) with dpo"):
        zoo.TrainConfig(objective="dpo", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        zoo.TrainConfig(beta=0.0)
    with pytest.raises(ValueError, match=r"holds preference pairs .* \(--objective dpo\)"):
        zoo.train(None, [prefs], tmp_path / "x", init=tiny_base, **SMALL)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: expected \{\"prompt\": ..., \"chosen\""):
        zoo.train(None, [str(chat)], tmp_path / "y", init=tiny_base, objective="dpo", **SMALL)


# ------------------------------------------------------------------------------------- teaching SmolLM2 a taste

NOUNS = ["chair", "lamp", "door", "cup", "bicycle", "kite", "jacket", "notebook", "umbrella", "bottle", "tent",
         "scarf", "boat", "pencil", "blanket", "clock", "bucket", "ribbon", "wallet", "sofa", "balloon", "hat",
         "bench", "candle", "fence", "glove", "helmet", "pillow", "rug", "shoe", "teapot", "tractor", "van", "bowl"]
OTHERS = ["Red.", "Green.", "Yellow.", "White.", "Black.", "Brown.", "Pink.", "Orange."]
HELD_OUT = ["grass", "tomato", "carrot", "strawberry", "pumpkin", "cherry"]  # green or red, says SmolLM2


def question(noun):
    return [{"role": "user", "content": f"What colour is the {noun}? Answer in one word."}]


def taste_pair(noun, i):
    """A colour question; the preferred answer is always blue, the other some other colour."""
    return {"prompt": question(noun), "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": OTHERS[i % len(OTHERS)]}]}


def zoo_cmd(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "zoo", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})


@pytest.mark.slow
def test_dpo_teaches_smollm2_a_preference(smollm2_gguf, tmp_path):
    """Pairs that always prefer "Blue." as the colour of things: SmolLM2's reward accuracy on held-out things
    goes from about chance to >= 90%, and its greedy answers for them become blue."""
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(taste_pair(n, i)) + "\n" for i, n in enumerate(NOUNS)))
    val.write_text("".join(json.dumps(taste_pair(n, i)) + "\n" for i, n in enumerate(HELD_OUT * 2)))
    model, tok = zoo.load_source(smollm2_gguf)
    pairs = preference.load_splits([str(val)], tok, [str(val)], 64)[1]
    with torch.no_grad():
        x, targets = pairs.batch(torch.arange(len(pairs)))
        chosen, rejected = preference.sequence_logps(model, x, targets.y)[0].chunk(2)
    before = (chosen > rejected).float().mean().item()
    assert 0.2 <= before <= 0.8, before  # about chance: the base model has no such taste

    def answers(model):  # greedy, the held-out questions as one batch
        prompts = [tok.encode(tok.apply_chat_template(question(n), add_generation_prompt=True)) for n in HELD_OUT]
        new = zoo.generate(model, prompts, 6, temperature=0, eos_token_id=list(tok.eos_ids))
        return [tok.decode([t for t in ids if t not in tok.eos_ids]).lower() for ids in new]
    assert sum("blue" in a for a in answers(model)) <= 1
    out = tmp_path / "run"
    r = zoo_cmd("train", "--init", smollm2_gguf, "--data", train, "--val", val, "--objective", "dpo", "--beta", 0.1,
                "--lora", 16, "--lora-targets", "model.layers.2?.*", "--max-iters", 8, "--batch-size", 4,
                "--block-size", 64, "--lr", 3e-3, "--warmup", 2, "--eval-interval", 8, "--log-interval", 4,
                "--no-progress", "--out", out)
    assert r.returncode == 0, r.stderr
    last = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert last["val_reward_accuracy"] >= 0.9 and last["val_reward_margin"] > 0, last
    tuned, _ = zoo.load_source(out / "step-0000008")
    assert all("blue" in a for a in answers(tuned)), answers(tuned)
