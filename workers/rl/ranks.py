"""One job on several devices: the ranks of its process group and everything they exchange.

A job with `n_devices` > 1 runs one process per device (`launch.py` starts them): rank 0 is the
job runner's own process, the only one that talks to the database, the object store and the
grader; the others compute. A step, as every rank runs it:

- sampling is split by prompt: rank r samples a contiguous share of the step's prompts, each
  prompt with a seed of its own (`rollout.RowUniforms`), so the completions are those one process
  would have drawn; the shares are gathered so every rank holds the whole rollout;
- rank 0 grades the whole rollout and sends the grades to all (one grader sandbox and one judge a job);
- every rank then takes the same decisions (refill, advantages) on the same data and trains on its
  share of the groups; gradients are summed across ranks, not averaged: the loss is already
  normalised by the whole batch's token count, so the sum is the single-process gradient.

Data parallel (LoRA, where the trained part is small): every rank holds the whole model; the
trained gradients are all-reduced. FSDP2 (full fine-tuning): each decoder layer is sharded
(`fully_shard`), its gradients reduce-scattered and its AdamW moments kept per shard; the
embeddings, final norm and head stay whole and are all-reduced like data parallel, because the
chunked loss (`chunked.py`) uses the head's weight outside any module's forward, where FSDP2 would
not gather it, and the head is often tied to the embeddings. FSDP2 runs a collective in every
sharded layer's forward and backward, so every rank must run the same sequence of passes: the
update gives each rank the same number of micro-batches (an empty one runs a row with no weight),
and the shared-prompt pass is taken always or never (`always_share`). Sampling, whose length
differs by rank, runs with the layers gathered and no collective (`gathered`).

Every collective waits at most `RFT_DISTRIBUTED_TIMEOUT_SECONDS`; a rank that died or fell silent
surfaces as `RankLost` on the others (the job runner requeues the job) instead of a hang.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.context import RankLost
from workers.rl.rollout import Rollout, concat


def share(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous part of `n` items: the first `n % world` ranks take one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass
class Ranks:
    """This process's place in its job's process group; a single process is rank 0 of 1, for which
    every exchange is the identity."""

    rank: int = 0
    world: int = 1
    sharded: bool = False  # FSDP2 over the decoder layers (full fine-tuning); else data parallel
    describe_failure: Callable[[], str] = field(default=lambda: "", repr=False)  # what rank 0 knows of the others

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def describe(self, device: str) -> str:
        """The job event that says how the job spreads over its devices."""
        how = (
            "FSDP2 (each decoder layer sharded over the ranks)"
            if self.sharded
            else "data parallel (the whole model on every rank)"
        )
        return (
            f"Training on {self.world} devices ({device}), {how}: each rank samples a share of the prompts, "
            "rank 0 grades them all, and the gradients are summed over the ranks."
        )

    def share(self, n: int) -> range:
        return share(n, self.rank, self.world)

    def most(self, n: int) -> int:
        """The largest share of `n` items any rank has."""
        return -(-n // self.world)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (RuntimeError, ValueError) as exc:  # gloo and NCCL raise RuntimeError subclasses
            others = self.describe_failure()
            raise RankLost(
                f"Rank {self.rank} of {self.world} lost the others during {what}: "
                + (f"{others} ({_short(exc)})" if others else _short(exc))
            ) from exc

    # -- exchanges ---------------------------------------------------------------------------------
    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        self._call("a broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        self._call("a sum", lambda: dist.all_reduce(t))
        return [float(v) for v in t.tolist()]

    def copy_from_leader(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's, in place."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            self._call("copying rank 0's weights", functools.partial(dist.broadcast, t.data, src=0))

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._call("a barrier", dist.barrier)

    @contextlib.contextmanager
    def leader_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, the others after it (a first load that fills a shared cache)."""
        if not self.leader:
            self.barrier()
        yield
        if self.leader:
            self.barrier()

    def gather_rollout(self, local: Rollout | None, pad_id: int, device: torch.device) -> Rollout:
        """Every rank's share of a sampling call, in rank order, as one rollout (on every rank). The
        prompt passes kept for the update do not travel (`Rollout.prefix` is None)."""
        if not self.distributed:
            assert local is not None
            return local
        import torch.distributed as dist

        mine = None if local is None else _to_cpu(local)
        parts: list[Any] = [None] * self.world
        self._call("gathering the rollout", lambda: dist.all_gather_object(parts, mine))
        found = [p for p in parts if p is not None]
        whole = found[0]
        for part in found[1:]:
            whole = concat(whole, part, pad_id)
        return _to(whole, device)

    # -- gradients -----------------------------------------------------------------------------------
    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of the parameters every rank holds whole (FSDP2 reduces its shards
        itself). A rank whose micro-batches all carried no loss has no gradient: it adds zeros,
        and where no rank has one the gradients stay None (the optimizer then skips them, as it
        would in one process)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        whole = [p for p in params if not _is_sharded(p)]
        if not whole:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in whole]
        had = torch.tensor([float(any(p.grad is not None for p in whole))], device=grads[0].device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [had])
        self._call("summing gradients", lambda: dist.all_reduce(flat))
        if flat[-1].item() == 0:
            return
        offset = 0
        for p, g in zip(whole, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    def clip_gradients(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """The gradients' global norm before clipping, and clip them to `max_norm` (as
        `torch.nn.utils.clip_grad_norm_` does: scale by max_norm / (norm + 1e-6) where that is below 1)."""
        if not self.sharded:  # whole gradients, the same on every rank
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        grads = [p.grad for p in params if p.grad is not None]
        local = sum((float(_local(g).float().pow(2).sum()) for g in grads if _is_sharded(g)), 0.0)
        whole = sum((float(g.float().pow(2).sum()) for g in grads if not _is_sharded(g)), 0.0)
        norm = math.sqrt(self.sum([local])[0] + whole)
        coefficient = max_norm / (norm + 1e-6)
        if coefficient < 1.0:
            for g in grads:
                g.mul_(coefficient)
        return norm

    # -- FSDP2 ---------------------------------------------------------------------------------------
    def shard(self, model: Any) -> None:
        """Shard `model`'s decoder layers over the ranks (FSDP2) where this job is sharded."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in _layers(model):
            # Said outright: left to its default, a module with no FSDP2 module above it (each layer
            # here) keeps its weights gathered after a forward pass, for a backward that for the
            # frozen reference never comes: its layers then stayed whole on every rank after its
            # first pass (measured: 0.4 GiB a rank at 135M, all of the reference's share).
            fully_shard(layer, reshard_after_forward=True)
            layer.set_gradient_divide_factor(1.0)  # sum, not mean: see the module docstring
            layer.set_force_sum_reduction_for_comms(True)  # gloo has no AVG or PREMUL_SUM

    @contextlib.contextmanager
    def gathered(self, *models: Any) -> Iterator[None]:
        """Each sharded layer's weights whole on every rank for the block, which may then run any
        number of forward passes without a collective (sampling: its length differs by rank)."""
        layers = [layer for m in models if self.sharded and m is not None for layer in _layers(m)]
        for layer in layers:
            layer.set_reshard_after_forward(False)
            self._call("gathering the weights", layer.unshard)
        try:
            yield
        finally:
            for layer in layers:
                layer.reshard()
                layer.set_reshard_after_forward(True)

    def _device(self) -> torch.device:
        import torch.distributed as dist

        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


SINGLE = Ranks()


def _short(exc: BaseException) -> str:
    """A collective's error without gloo's source location and advice."""
    text = re.sub(r"^\[[^\]]*\] ", "", str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
    return text.split(". This is typically caused")[0]


def _layers(model: Any) -> list[Any]:
    """The decoder layers of a causal LM (through PEFT's wrappers)."""
    body = model.get_decoder()
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")
    return list(layers)


def _is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if _is_sharded(t) else t  # type: ignore[no-any-return]


def _to_cpu(r: Rollout) -> Rollout:
    return _to(r, torch.device("cpu"))


def _to(r: Rollout, device: torch.device) -> Rollout:
    logprobs = None if r.sampler_logprobs is None else r.sampler_logprobs.to(device)
    return Rollout(
        r.input_ids.to(device),
        r.attention_mask.to(device),
        r.completion_mask.to(device),
        r.prompt_len,
        r.texts,
        r.truncated.to(device),
        None,
        logprobs,
        r.finish_reasons,
    )
