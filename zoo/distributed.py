"""Training past one process: torchrun's process group, DDP, FSDP2 and activation checkpointing.

All of it is PyTorch's own engines: DistributedDataParallel copies the model to every rank;
`fully_shard` (FSDP2) shards parameters, gradients and optimizer state across ranks, each transformer
block a unit of its own; `torch.utils.checkpoint` recomputes each block's activations in the backward
pass instead of keeping them. Checkpoints are always written as the full model by rank 0, so a run's
folders read the same whichever engine trained it.
"""
import os
import sys
from contextlib import nullcontext

import torch
from torch.distributed._composable import checkpoint as checkpoint_module


class Distributed:
    """torchrun's environment, or a single process (rank 0 of 1)."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist
            if device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")

    def mean(self, t):
        if self.world > 1:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t

    def share(self, values):
        """rank 0's numbers, on every rank (decisions taken on rank 0 must be taken everywhere)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.broadcast(t, 0)
        return t.tolist()

    def close(self):
        # on this machine a gloo job can abort at exit unless every rank gets here before teardown
        if self.world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


def blocks(model):
    """The transformer blocks of a zoo model: the members of its layer list (none for the bigram)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return [block for layers in lists for block in layers]


def checkpoint_blocks(model):
    """Recompute each block's activations during the backward pass (non-reentrant torch.utils.checkpoint):
    the same gradients, with one block's activations alive at a time instead of all of them. Through torch's
    composable checkpoint, which works by module hooks (as fully_shard does, and composes with it): the
    blocks keep their class, forward and names. In evaluation (no grad) there is nothing to save."""
    for block in blocks(model):
        checkpoint_module(block)
    return model


def shard(model, bf16):
    """FSDP2: each block and then the whole model become fully_shard units (in place). With bf16 the
    parameters are gathered and computed in bf16 and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def wrap(model, s, world):
    """The module the training step calls: the model itself (sharded in place by FSDP), or DDP around it;
    compiled when asked."""
    net = torch.compile(model) if s.compile else model
    if world > 1 and not s.fsdp:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(net, device_ids=[s.device] if s.device.startswith("cuda") else None)
    return net


def gradient_sync(net, model, sync, fsdp):
    """A context in which backward reduces gradients across ranks only when `sync` (the last micro-batch)."""
    if fsdp:
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    if sync or not hasattr(net, "no_sync"):
        return nullcontext()
    return net.no_sync()


def full_state(model, optimizer, fsdp):
    """(model state dict, optimizer state dict) as full tensors on the CPU. With FSDP every rank must call
    this (it gathers the shards); the optimizer state is then keyed by parameter name."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state, fsdp):
    """Restore what full_state saved, onto the optimizer of a (sharded) model."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
