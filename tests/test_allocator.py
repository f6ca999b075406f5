"""zoo/allocator.py: `zoo train` keeps freed memory for the next step's tensors instead of faulting in fresh pages."""
import os
import platform
import subprocess
import sys

import pytest

import zoo.cli
import zoo.commands.train
from zoo.allocator import keep_freed_memory

# 15 training steps' forward and backward of shakespeare-char on one thread; prints whether the setting was made and
# the page faults of the last 10 steps. glibc's default hands much of each step's freed activations back to the
# kernel and faults them in again the next step (1,477-7,463 faults over the 10 steps in 8 runs; AdamW's step,
# left out here, adds more); kept, the steps reuse them (1-192 in 4).
STEPS = """
import resource, sys, torch, zoo
from zoo.allocator import keep_freed_memory
from zoo.quantization import native_bf16
kept = sys.argv[1] == "keep" and keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = zoo.load("shakespeare-char")
x = torch.randint(0, 65, (12, 64))
for i in range(15):
    if i == 5:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16()):  # as zoo train runs its preset
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""
# the environment without malloc's own tunables (which keep_freed_memory leaves alone), so both runs start alike
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES",
                                                                                              "LD_PRELOAD")}


def faults(mode):
    r = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, env=CLEAN_ENV, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    kept, n = r.stdout.split()
    return kept == "True", int(n)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")
def test_kept_memory_spares_a_training_step_its_page_faults():
    kept_plain, plain = faults("plain")
    if plain < 1000:
        pytest.skip(f"this machine's malloc already reuses a step's memory ({plain} faults in 10 steps)")
    kept, fewer = faults("keep")
    assert not kept_plain and kept
    assert fewer * 4 < plain, (plain, fewer)


def test_settings_in_the_environment_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False  # returns before calling mallopt: this process's malloc is unchanged
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.top_pad=0")
    assert keep_freed_memory() is False


def test_zoo_train_sets_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(zoo.commands.train, "keep_freed_memory", lambda: calls.append("train"))
    monkeypatch.setattr(zoo.commands.train, "train", lambda *a, **k: None)  # the command's own work, not the run
    (tmp_path / "a.txt").write_text("hello")
    assert zoo.cli.main(["train", "shakespeare-char", "--data", str(tmp_path / "a.txt"), "--out",
                         str(tmp_path / "run")]) == 0
    assert calls == ["train"]
