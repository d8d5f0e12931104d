"""Many ranks (``torchrun``): who solves what, failures agreed on, factors shared (docs/design.md §6.5).

When ``torch.distributed`` is initialised, :func:`loradafast.initialize` runs "owner computes":
every rank streams its own shard of the samples through the model, each input group's sums are
reduced to the one rank that solves it (:func:`loradafast.statistics.hooks.reduce_to_owners`),
chosen by the estimated cost of its solve (:func:`loradafast.planner.assign_owners`), and the
factors are then broadcast by their owners so that every rank ends with the same adapter.

Every collective is entered by every rank in the same order.  A rank that fails does not leave
the others waiting: the stages end at a synchronisation point (:func:`agree_on_failure`) where
every rank learns whether any failed, and all raise before the model is touched.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .layer_init import LayerInit


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process reports (progress bars, info logs): rank 0, or the only process."""
    return rank() == 0


class MainRankOnly(logging.Filter):
    """Drops the records below WARNING on every rank but 0: one log of a run, not one per rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_main()


MAIN_RANK_ONLY = MainRankOnly()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``: the pass runs it directly
    (no gradient is reduced; DDP's own forward would expect trainable parameters)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether some parameter is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


class RankFailedError(RuntimeError):
    """Another rank of the run failed; this one stopped at the same point, its model unchanged."""


def agree_on_failure(error: BaseException | None, stage: str, share=None) -> list:
    """A synchronisation point: every rank says whether it failed in ``stage``.  If any did, each
    rank raises: its own error where it had one, otherwise :class:`RankFailedError` naming the
    first rank that failed and its message.  Without a process group, re-raises ``error``.

    ``share``: a small picklable value that travels in the same gather, so that a stage which must
    share its result (the probe's input groups) needs no collective of its own, which a rank that
    failed before it would never reach; returns every rank's, by rank (``[share]`` alone)."""
    if not is_distributed():
        if error is not None:
            raise error
        return [share]
    mine = None if error is None else f"{type(error).__name__}: {error}"
    everyone = [None] * world_size()
    torch.distributed.all_gather_object(everyone, (mine, None if error is not None else share))
    failed = [(r, m) for r, (m, _) in enumerate(everyone) if m is not None]
    if error is not None:
        raise error
    if failed:
        r, message = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise RankFailedError(
            f"rank {r}{others} failed during {stage}, so every rank stopped there and no model was changed: "
            f"{message}"
        )
    return [value for _, value in everyone]


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight as one full tensor: an FSDP2 (``DTensor``) shard is gathered, which is a collective
    that every rank must enter; a plain tensor is returned as it is."""
    full_tensor = getattr(weight, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else weight


def weights_to_owners(targets, owners: dict[str, int]) -> dict[str, torch.Tensor]:
    """``{name: W [out, in]}`` of the layers this rank solves.  Sharded weights are gathered one
    layer at a time, in model order, by every rank, and dropped at once by the ranks that do not
    own the layer: a rank never holds more full weights than those it solves."""
    me = rank()
    out = {}
    for t in targets:
        w = full_weight(t.weight_out_in().detach())
        if owners.get(t.name, me) == me:
            out[t.name] = w
        del w
    return out


def broadcast_layers(local: dict, names: list[str], owners: dict[str, int]) -> dict:
    """Every layer's :class:`~loradafast.layer_init.LayerInit`, from the ranks that solved them, on
    every rank.  ``local`` holds this rank's layers; the factors travel as one flat fp32 buffer per
    owner (``Σ r·(in + out)`` per layer), their diagnostics as small pickled objects."""
    import torch.distributed as dist

    me, world = rank(), world_size()
    device = _device_of(local)
    # Shapes, kinds and diagnostics first: small, and they tell every rank how to cut the buffers.
    meta = {n: (tuple(x.lora_A.shape), tuple(x.lora_B.shape), x.kind, x.subtract_scaling,
                _to_cpu(x.diagnostics)) for n, x in local.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, meta)
    everything = {}
    for owner in range(world):
        theirs = [n for n in names if owners[n] == owner]
        shapes = gathered[owner]
        sizes = [_numel(shapes[n][0]) + _numel(shapes[n][1]) for n in theirs]
        if not sum(sizes):
            continue
        if owner == me:
            flat = torch.cat([t.reshape(-1).float() for n in theirs
                              for t in (local[n].lora_A, local[n].lora_B)]).to(device)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        dist.broadcast(flat, src=owner)
        for n, piece in zip(theirs, flat.split(sizes)):
            a_shape, b_shape, kind, subtract, diagnostics = shapes[n]
            a, b = piece.split([_numel(a_shape), _numel(b_shape)])
            everything[n] = local[n] if owner == me else LayerInit(
                n, a.reshape(a_shape).clone(), b.reshape(b_shape).clone(), kind=kind, subtract_scaling=subtract,
                diagnostics=diagnostics)
    return everything


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _device_of(local: dict) -> torch.device:
    """The device collectives run on: the backend's (CUDA for NCCL), else where the factors are."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_cpu(diagnostics):
    import dataclasses

    if diagnostics is None or not dataclasses.is_dataclass(diagnostics):
        return diagnostics
    changes = {f.name: getattr(diagnostics, f.name).cpu() for f in dataclasses.fields(diagnostics)
               if torch.is_tensor(getattr(diagnostics, f.name))}
    return dataclasses.replace(diagnostics, **changes)
