"""Data parallelism for the trainer under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N -m ctpo_lab.train ...``: every rank samples the same ``batch_prompts`` prompts
of a step and keeps its contiguous shard of ``batch_prompts / N`` prompts (× ``group_size`` responses, own
sampling generator); mini-batches hold ``mini_batch_prompts / N`` prompts per rank, so the number of
optimizer updates per rollout batch is unchanged; gradients are averaged by DDP; decisions that must agree
(skip a non-finite update, stop after Ctrl-C) are all-reduced; metrics are averaged over ranks (``*/max`` and
``*/min`` reduced by max/min); the held-out evaluation is sharded and summed; rank 0 alone writes the run
folder, each rank writes its own ratio dump ``step_XXXXXXX_rank_XXXX.npz``.  Backend: NCCL on CUDA, gloo
on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = ["Dist", "init_distributed"]


@dataclass(frozen=True)
class Dist:
    """Rank information; every collective is a no-op for a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], device=device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch_dist.all_reduce(t)
        return t.cpu().tolist()

    def reduce_record(self, record: dict[str, float], device: torch.device) -> dict[str, float]:
        """Mean over ranks of every numeric entry (``*/max`` → max, ``*/min`` → min); others from rank 0."""
        if not self.active:
            return record
        keys = sorted(k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        out = dict(record)
        for op, select in (
            (torch_dist.ReduceOp.MAX, lambda k: k.endswith("/max")),
            (torch_dist.ReduceOp.MIN, lambda k: k.endswith("/min")),
            (torch_dist.ReduceOp.SUM, lambda k: not k.endswith(("/max", "/min"))),
        ):
            ks = [k for k in keys if select(k)]
            if not ks:
                continue
            t = torch.tensor([float(record[k]) for k in ks], dtype=torch.float64, device=device)
            torch_dist.all_reduce(t, op=op)
            if op == torch_dist.ReduceOp.SUM:
                t = t / self.world
            out.update(zip(ks, t.cpu().tolist()))
        return out

    def close(self) -> None:
        if self.initialized_here and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_distributed(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), else a
    single-process :class:`Dist`. Returns the rank info and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world <= 1:
        return Dist(), torch.device(
            "cuda" if cuda and device == "auto" else ("cpu" if device == "auto" else device)
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
        here = True
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    return Dist(rank, world, local_rank, here), dev
