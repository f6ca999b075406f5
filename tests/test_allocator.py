"""zoo/allocator.py: the `zoo` command keeps freed memory for the next tensor instead of faulting in fresh pages."""
import subprocess
import sys

import pytest

import zoo.cli

# 15 training steps' forward and backward of shakespeare-char; prints the page faults of the last 10. glibc's
# default hands much of each step's freed activations back to the kernel and faults them in again the next step
# (2,500-8,800 faults over the 10 steps, measured); kept, the step reuses them (0-200).
STEPS = """
import resource, sys, torch, zoo
from zoo.allocator import keep_freed_memory
kept = sys.argv[1] == "keep" and keep_freed_memory()
torch.manual_seed(0)
model = zoo.load("shakespeare-char")
x = torch.randint(0, 65, (12, 64))
for i in range(15):
    if i == 5:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_kept_memory_spares_a_training_step_its_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout
        kept, n = out.split()
        return kept == "True", int(n)

    (kept_plain, plain), (kept, fewer) = faults("plain"), faults("keep")
    assert not kept_plain and kept
    assert plain > 1000 and fewer * 4 < plain, (plain, fewer)


def test_the_zoo_command_sets_it(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(zoo.cli, "keep_freed_memory", lambda: calls.append(1))
    assert zoo.cli.main(["list"]) == 0
    assert calls == [1]
