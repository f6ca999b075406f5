"""Shared test fixtures: tests that take `device` run on the CPU, and on CUDA too when a GPU is present."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
