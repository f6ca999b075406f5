"""The built wheel: it ships zoo, zoo.models and the weights maps, and claims no top-level `models`."""
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"zoo"}, f"the wheel must install only the zoo package, not {top_level}"
    for arch in ("bigram", "scratchformer", "gpt2", "llama", "mqa"):
        assert f"zoo/models/{arch}.py" in names
    maps = {f"zoo/weights_maps/{p.name}" for p in (ROOT / "weights_maps").glob("*.json")}
    assert maps <= set(names), f"weights maps missing from the wheel: {maps - set(names)}"
    assert "zoo/static/chat.html" in names, "zoo serve's chat page is missing from the wheel"

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    script = f"""
import sys
sys.path.insert(0, {str(target)!r})
import torch, zoo, zoo.models.llama
assert zoo.__file__.startswith({str(target)!r}), zoo.__file__
model = zoo.load("shakespeare-char")
assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 65)
try:
    import models
except ImportError:
    print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr + run.stdout


def test_public_functions_survive_importing_their_modules():
    """zoo.generate and zoo.verify are functions and also module names; importing the modules (as the
    command line does) must not rebind the package's attributes."""
    import importlib

    import zoo
    for name in ("generate", "complete", "verify", "from_pretrained", "save_pretrained", "tokenizer", "list"):
        assert callable(getattr(zoo, name)) and not isinstance(getattr(zoo, name), type(zoo)), name
    for module in ("zoo.generation", "zoo.verification", "zoo.cli"):
        importlib.import_module(module)
    assert callable(zoo.generate) and callable(zoo.verify) and not isinstance(zoo.verify, type(zoo))
