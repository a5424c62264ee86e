"""Multi-process training plumbing on torch's own APIs: launch checks, process group, FSDP2 sharding, checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import TidarError

SHARDED_STATE_DIR = "sharded_state"  # torch.distributed.checkpoint folder (model + optimizer shards)


def backend_for(device: str) -> str:
    """NCCL for CUDA, gloo for CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_launch(nproc: int, device: str, batch_size: int, world: int | None = None) -> None:
    """One-line errors for a world that cannot run: missing backend, more ranks on this node than
    devices, a global batch the world size (default ``nproc``) does not divide."""
    if nproc < 1:
        raise TidarError(f"--nproc must be >= 1, got {nproc}")
    backend = backend_for(device)
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise TidarError(
            f"torch.distributed backend {backend!r} (for device {torch.device(device).type}) is not available "
            f"in this torch build ({torch.__version__})"
        )
    world = nproc if world is None else world
    if batch_size % world:
        raise TidarError(
            f"batch size {batch_size} is not divisible by {world} ranks "
            "(each rank takes batch_size / world_size rows of the global batch)"
        )
    kind = torch.device(device).type
    if kind == "cuda":
        have, what = torch.cuda.device_count(), "CUDA devices"
    elif kind == "cpu":
        have, what = len(os.sched_getaffinity(0)), "CPU cores (one per rank)"
    else:
        raise TidarError(f"distributed training runs on cpu or cuda, got device {device!r}")
    if nproc > have:
        raise TidarError(f"{nproc} ranks on this node but only {have} {what}")


@dataclass
class DistEnv:
    """This process's place in the world; ``world == 1`` means no process group."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """Average of a float over ranks (the loss of the global batch)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str, batch_size: int) -> DistEnv:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv(device=device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    check_launch(local_world, device, batch_size, world)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    dist.init_process_group(backend_for(device))
    return DistEnv(rank=rank, world=world, device=device)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of an HF Llama / Qwen2 / Qwen3 causal LM."""
    return model.model.layers


def checkpoint_activations(model) -> None:
    """Recompute each decoder layer's activations in backward (torch's non-reentrant checkpoint)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


def shard(model, env: DistEnv, bf16: bool):
    """FSDP2: every decoder layer, then the root (embeddings, norm, head); bf16 params and fp32 grad reduce on CUDA."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(env.device).type, (env.world,))
    kwargs = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model) -> dict:
    """The unsharded model weights on CPU on rank 0 (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model, opt, out: Path) -> None:
    """Model and optimizer shards with torch.distributed.checkpoint (every rank writes its own)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / SHARDED_STATE_DIR))


def load_sharded(model, opt, out: Path) -> None:
    """Load what ``save_sharded`` wrote (any world size: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = out / SHARDED_STATE_DIR
    if not folder.is_dir():
        raise TidarError(f"cannot resume a distributed run: {folder} (sharded model/optimizer state) is missing")
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
