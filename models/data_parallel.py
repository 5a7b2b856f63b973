"""Data-parallel training's view of one global batch: which rows a worker computes, and how workers agree.

Every worker builds the same global batch (same seed, same sampler) and encodes its own rows of it: a
contiguous share of the batch's distinct images and of its captions. `Worker.gather` gives every worker all the
rows back with their gradients (torch.distributed.nn's all_gather, whose backward sums each row's gradients from
every worker into the worker that computed the row), so each worker computes the loss of the whole global batch,
the same number everywhere. DDP then averages the workers' gradients: the encoders' share of each is `world`
times that worker's rows' part of the global gradient, the rest (composer, loss modules) is the whole global
gradient on every worker, so the average is exactly the single-process gradient. BatchNorm is the one layer
that would otherwise see only a worker's rows: `GlobalBatchNorm` normalises with the global batch's statistics.

`Worker()` is the single process: its rows are everything, gathering and agreeing change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Worker:
    """One process of data-parallel training: its rank among `world` workers, and the device it trains on."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # NCCL collectives need CUDA tensors

    @property
    def leader(self) -> bool:
        """Rank 0 validates, writes the run directory and decides what depends on a clock."""
        return self.rank == 0

    def rows(self, n: int, rank: int | None = None) -> slice:
        """The rows of n that worker `rank` (default: this one) computes: contiguous, sizes differing by at most
        one, in rank order."""
        rank = self.rank if rank is None else rank
        per, extra = divmod(n, self.world)
        start = rank * per + min(rank, extra)
        return slice(start, start + per + (rank < extra))

    def gather(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """All n rows, in order, from each worker's `part` (its `rows(n)`); gradients flow back to every part."""
        if self.world == 1:
            return part
        size = -(-n // self.world)  # all_gather needs equal shapes: pad every part to the largest
        padded = torch.cat([part, part.new_zeros((size - len(part), *part.shape[1:]))])
        pieces = _all_gather(padded).split(size)
        spans = [self.rows(n, rank) for rank in range(self.world)]
        return torch.cat([piece[:span.stop - span.start] for span, piece in zip(spans, pieces)])

    def agree(self, *values: float) -> tuple[float, ...]:
        """Rank 0's values on every worker. Whatever follows a clock (time budgets, when to validate or save)
        must be decided once: workers that disagree would stop calling the same collectives and hang."""
        if self.world == 1:
            return values
        decided = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(decided, src=0)
        return tuple(decided.tolist())

    def parallel(self, module: nn.Module) -> nn.Module:
        """`module` (on this worker's device, its trainable parameters marked) as this worker trains it: alone,
        as is; else with global BatchNorm, in DDP. A static graph (the same parameters used every step) lets DDP
        skip parameters that a stage trains but its loss never reaches (TMCIR's IACMA temperature while ATF
        trains) without searching the graph for them at every step."""
        if self.world == 1:
            return module
        global_batch_norm(module)
        return DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       static_graph=True)


SINGLE = Worker()  # one process: every row is its own


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are the global batch's: per-channel sums over every worker's rows
    (all_reduce, with gradients), as one process holding the whole batch would compute them, running
    statistics included. torch's SyncBatchNorm does this on GPUs only; this one runs on gloo and NCCL alike."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics under autocast, as cuDNN's
        # The row count rides along with the sums: one collective for both.
        sums = _all_reduce(torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() / xf.shape[1]])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = _all_reduce(centred.pow(2).sum(dims)) / count  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every torch BatchNorm layer inside `module` by a GlobalBatchNorm holding the same parameters and
    buffers (the same objects): state_dict keys and values, and so checkpoints, are unchanged."""
    found = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
             if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]
    for parent, name, bn in found:
        new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var, new.num_batches_tracked = (bn.running_mean, bn.running_var,
                                                                      bn.num_batches_tracked)
        setattr(parent, name, new.train(bn.training))
    return module


# torch's differentiable collectives (the backward of a gather is a summing reduce-scatter, of an all_reduce an
# all_reduce); torch.distributed.nn.functional's are deprecated in their favour. Imported when used: torch builds
# without them (older ones) still run single-process training.
def _all_gather(part: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as collectives

    return collectives.all_gather_single(part, 0, dist.group.WORLD)


def _all_reduce(part: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as collectives

    return collectives.all_reduce(part, "sum", dist.group.WORLD)
