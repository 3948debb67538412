"""The processes of one run: who they are, which share of the work is theirs, and how the shares meet.

Under ``torchrun``, SLURM (``srun``) or ``--devices N --strategy ddp``, a run is several processes
(ranks). :func:`join` starts them, through Lightning Fabric's launcher (which re-runs the command once
per extra device, as the Trainer's own launcher does), or joins those an outside launcher started, and
initializes ``torch.distributed`` once for the whole run (gloo on CPUs, NCCL on GPUs); the Trainer that
fine-tunes later finds that process group and uses it. The collectives below send tensors only (JSON
travels as its UTF-8 bytes): nothing is pickled between ranks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["World", "SINGLE", "join", "requested_world", "first_launched", "launch_layout", "share", "owners",
           "all_gather_rows", "all_gather_json", "broadcast_json", "broadcast_module", "barrier"]


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def is_zero(self) -> bool:
        """True in the process that alone writes the run directory."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.size > 1


SINGLE = World()


def requested_world(devices: int | str, num_nodes: int) -> int:
    """Processes asked for: an outside launcher's world (``WORLD_SIZE``, SLURM's tasks), or ``devices x
    num_nodes``."""
    outside = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    ours = (devices if isinstance(devices, int) else 1) * max(1, num_nodes)
    return max(outside, ours)


def launch_layout(devices: int | str = 1, num_nodes: int = 1) -> tuple[int | str, int]:
    """``(devices, num_nodes)`` for this run: torchrun's (``LOCAL_WORLD_SIZE`` per node) or SLURM's (tasks per
    node, nodes) when an outside launcher started this process and the options were left at one process;
    else the options as given."""
    if devices not in (1, "1", "auto") or num_nodes != 1:
        return devices, num_nodes
    env = os.environ
    if env.get("LOCAL_WORLD_SIZE") and env.get("WORLD_SIZE"):  # torchrun
        local = int(env["LOCAL_WORLD_SIZE"])
        return local, max(1, int(env["WORLD_SIZE"]) // max(1, local))
    if int(env.get("SLURM_NTASKS") or 1) > 1:  # srun
        nodes = int(env.get("SLURM_NNODES") or 1)
        per_node = (env.get("SLURM_NTASKS_PER_NODE") or "").split("(")[0]
        return (int(per_node) if per_node else int(env["SLURM_NTASKS"]) // nodes), nodes
    return devices, num_nodes


def first_launched() -> bool:
    """False in every process a launcher started but the very first (read before :func:`join`)."""
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def join(*, accelerator: str = "auto", devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto") -> World:
    """This process's place in the run, starting or joining the other processes when there are several.

    With one process nothing is initialized and :data:`SINGLE` is returned. Otherwise Lightning Fabric
    (strategy ``ddp``) launches the missing local processes, or detects torchrun's or SLURM's, and
    initializes the process group; calling it again returns the same world.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    if requested_world(devices, num_nodes) <= 1:
        return SINGLE
    if strategy not in ("auto", "ddp") and not (strategy.startswith("ddp") and "spawn" not in strategy
                                                and "notebook" not in strategy and "fork" not in strategy):
        raise ConfigError(f"--strategy {strategy!r}: a run over several processes uses --strategy ddp (each process "
                          "runs the whole command: extraction, head and evaluation are shared, not only training).")
    import lightning as L

    from .training.trainer import quiet_lightning

    quiet_lightning()
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return World(fabric.global_rank, fabric.world_size)


def share(n: int, world: World, block: int = 1) -> list[int]:
    """This rank's indices of ``range(n)``: blocks of ``block`` consecutive items dealt round-robin (rank
    ``r`` takes blocks ``r, r + size, ...``). The shares are disjoint, cover every index, are the same on
    every machine, and a block of batch size is the batch one process would have formed."""
    blocks = math.ceil(n / max(1, block))
    return [i for b in range(world.rank, blocks, world.size) for i in range(b * block, min(n, (b + 1) * block))]


def owners(n: int, world: World, block: int = 1) -> list[list[int]]:
    """Every rank's :func:`share`, in rank order."""
    return [share(n, World(r, world.size), block) for r in range(world.size)]


def _device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(world: World, rows: np.ndarray) -> list[np.ndarray]:
    """Every rank's ``rows`` (any number of them; the same trailing shape and dtype), in rank order."""
    if not world.active:
        return [rows]
    import torch.distributed as dist

    dev = _device()
    rows = np.ascontiguousarray(rows)
    local = torch.from_numpy(rows if rows.flags.writeable else rows.copy())
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world.size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[:local.shape[0]] = local.to(dev)
    out = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(out, padded)
    return [o[:k].cpu().numpy() for o, k in zip(out, sizes)]


def _json_bytes(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)


def all_gather_json(world: World, obj: Any) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order."""
    if not world.active:
        return [obj]
    return [json.loads(a.tobytes().decode("utf-8")) for a in all_gather_rows(world, _json_bytes(obj))]


def broadcast_json(world: World, obj: Any = None) -> Any:
    """Rank 0's JSON-able ``obj``, on every rank (the others' ``obj`` is ignored)."""
    if not world.active:
        return obj
    import torch.distributed as dist

    dev = _device()
    data = torch.from_numpy(_json_bytes(obj).copy()) if world.is_zero else torch.zeros(0, dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    dist.broadcast(size, 0)
    buf = data.to(dev) if world.is_zero else torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, 0)
    return json.loads(buf.cpu().numpy().tobytes().decode("utf-8"))


@torch.no_grad()
def broadcast_module(world: World, module: torch.nn.Module) -> torch.nn.Module:
    """Make every rank's ``module`` hold rank 0's parameters and buffers (same architecture everywhere)."""
    if not world.active:
        return module
    import torch.distributed as dist

    dev = _device()
    for value in module.state_dict().values():
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        buf = value.detach().contiguous().to(dev)
        dist.broadcast(buf, 0)
        value.copy_(buf.to(value.device))
    return module


def barrier(world: World) -> None:
    """Wait until every rank gets here."""
    if world.active:
        import torch.distributed as dist

        dist.barrier()
