"""Evaluation: sliding-window perplexity (HF's perplexity guide) and `zoo eval`, checked against
brute force and against transformers on the SmolLM2 GGUF."""
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.evaluation import sliding_window_loss, sources


def tiny_model():
    torch.manual_seed(0)
    return zoo.load("shakespeare-char", n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=32).eval()


def hf_guide_loss(logits_of, tokens, window, stride, keep=False):
    """The loop of Hugging Face's perplexity guide, written as the guide writes it (labels of -100 for
    context tokens; the loss shifts labels by one inside the model). keep: logits_of(ids, n) gives the logits of
    the last n positions only (transformers' logits_to_keep), those the loss reads: the same terms, summed alike."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        trg_len = end - prev_end
        input_ids = tokens[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        logits = logits_of(input_ids, trg_len + 1) if keep else logits_of(input_ids)
        labels = target_ids[:, 1:][:, -(logits.size(1) - 1):]  # (all of them, unless keep)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="sum")
        nll_sum += loss.item()
        n_tokens += int((labels != -100).sum())
        prev_end = end
        if end == len(tokens):
            break
    return nll_sum / n_tokens, n_tokens


@torch.no_grad()
@pytest.mark.parametrize("window,stride,batch", [(16, 6, 3), (32, 31, 2), (32, 8, 1), (20, 1, 7)])
def test_sliding_window_matches_the_hf_guide(window, stride, batch):
    model = tiny_model()
    tokens = torch.randint(50, (101,), generator=torch.Generator().manual_seed(1))
    ref, _ = hf_guide_loss(model, tokens, window, stride)
    assert sliding_window_loss(model, tokens, window, stride, batch) == pytest.approx(ref, rel=1e-6)


@torch.no_grad()
def test_every_token_scored_once_with_its_full_left_context():
    model = tiny_model()
    tokens = torch.randint(50, (60,), generator=torch.Generator().manual_seed(2))
    window = 12
    brute = sum(F.cross_entropy(model(tokens[max(0, t - window + 1):t + 1][None])[0, -2], tokens[t]).item()
                for t in range(1, len(tokens))) / (len(tokens) - 1)
    assert sliding_window_loss(model, tokens, window, 1, batch_size=5) == pytest.approx(brute, rel=1e-6)
    _, scored = hf_guide_loss(model, tokens, window, 5)
    assert scored == len(tokens) - 1


def test_bad_windows_are_clear_errors():
    model = tiny_model()
    tokens = torch.arange(40) % 50
    with pytest.raises(ValueError, match="stride"):
        sliding_window_loss(model, tokens, 16, 17)
    with pytest.raises(ValueError, match="block_size"):
        sliding_window_loss(model, tokens, 64, 8)
    with pytest.raises(ValueError, match="at least 2"):
        sliding_window_loss(model, tokens[:1], 16, 8)
    with pytest.raises(ValueError, match="window must be between 2"):
        sliding_window_loss(model, tokens, 1, 1)


def test_a_stride_of_a_whole_window_is_refused_by_both_scorers():
    """A window's first token is only context: with stride == window each later window's first token would
    never be scored (the sliding window once accepted it and silently skipped them). One rule for both."""
    model = tiny_model()
    tokens = torch.arange(40) % 50
    with pytest.raises(ValueError, match="stride must be between 1 and window - 1"):
        sliding_window_loss(model, tokens, 16, 16)
    with pytest.raises(ValueError, match="stride must be between 1 and window - 1"):
        zoo.score_rolling(model, tokens.tolist(), window=16, stride=16)


def test_a_bidirectional_model_is_refused_by_both_scorers():
    """A masked-LM model sees the token it is scored on: its causal loss is meaningless (near zero)."""
    model = zoo.load("shakespeare-char", n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=32,
                     causal=False).eval()
    tokens = torch.arange(40) % 50
    with pytest.raises(ValueError, match="bidirectional"):
        sliding_window_loss(model, tokens, 16, 8)
    with pytest.raises(ValueError, match="bidirectional"):
        zoo.score_rolling(model, tokens.tolist(), window=16, stride=8)


def test_damaged_checkpoints_set_aside_by_resume_are_not_evaluated(tmp_path):
    for name in ("step-0000020", "step-0000040", "step-0000040.damaged-1", ".tmp-step-0000060"):
        (tmp_path / name).mkdir()
    assert [label for label, _ in sources(str(tmp_path))] == ["step-0000020 ", "step-0000040 "]


def test_a_folder_of_checkpoints_is_evaluated_in_step_order(tmp_path):
    for step in (1000, 20, 300):
        (tmp_path / f"step-{step:07d}").mkdir()
    (tmp_path / "log.jsonl").write_text("")
    assert [label for label, _ in sources(str(tmp_path))] == ["step-0000020 ", "step-0000300 ", "step-0001000 "]
    assert sources(str(tmp_path / "step-0000020")) == [("", str(tmp_path / "step-0000020"))]


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_gguf_perplexity_matches_transformers(smollm2_gguf, shared_data, hf_smollm2):
    gguf = smollm2_gguf
    text = (shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    tokens = torch.tensor(zoo.tokenizer(str(gguf)).encode(text)[:1536])  # two windows
    window, stride = 1024, 512
    ours = math.exp(sliding_window_loss(zoo.from_pretrained(str(gguf)), tokens, window, stride, batch_size=2))
    ref_model = hf_smollm2[0]  # transformers' own reading of the same file
    ref = math.exp(hf_guide_loss(lambda ids: ref_model(ids).logits, tokens, window, stride)[0])
    assert ours == pytest.approx(ref, rel=1e-4)  # the same to 4 significant digits (18.07), as a number
