"""The statistics pass: one streaming forward+backward per batch, with hooks (docs/design.md §3).

For each target layer with input ``x_t`` and output gradient ``g_t = ∂ℓ_n/∂y_t`` (``ℓ_n`` the mean
token loss of sequence n), accumulate in fp32

* ``Σ g_t x_tᵀ`` (G, the weight gradient, never materialised as ``.grad``),
* ``Σ x_t x_tᵀ`` once per distinct input tensor (Z, shared by q/k/v, gate/up),
* ``Σ g_t²`` or ``Σ g_t g_tᵀ`` (Y, diag or full),

over the valid tokens (attention mask, sequences that have at least one label); ``factors=``
restricts the pass to some of them (a method's own needs: LoRA-GA and LoRA-One read G only).

The pass leaves the model as it found it: parameters' ``requires_grad``, train/eval modes and
hooks are restored even when it fails.  It never needs a parameter to require grad: every target
output passes through an identity Function that also takes a leaf requiring grad (the anchor), so
autograd reaches every target however frozen the model is, and the Function's backward records
the output gradient (see ``hooks.capture_grad`` for why that is a copy).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .. import distributed, kernels, planner, progress as _progress
from .._version import __version__
from ..linalg.dense import finite_flags
from ..options import Y_FACTORS, check_choice, check_pass_options
from .batches import END, IGNORE_INDEX, Batch, normalize_batch
from .losses import causal_lm_sequence_losses, next_token_labels
from .hooks import Accumulator, agree_on_layers, all_reduce, reduce_to_owners
from . import provenance
from .sums import LayerStats, Statistics, check_factors
from ..targets import Target, base_model_of, base_model_only, find_targets, model_device, model_meta

logger = logging.getLogger(__name__)
logger.addFilter(distributed.MAIN_RANK_ONLY)


def is_causal_lm(model: nn.Module) -> bool:
    base = base_model_of(model)
    config = getattr(base, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    name = type(base).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _check_autograd_available(model: nn.Module) -> None:
    # enable_grad() in the pass overrides no_grad() but not inference_mode(), whose tensors
    # cannot take part in a backward at all.
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "torch.inference_mode() is on, and the statistics pass needs gradients; call loradafast outside "
            "the `with torch.inference_mode():` block (torch.no_grad() is fine: the pass turns gradients on)"
        )
    if any(p.is_inference() for p in model.parameters()):
        raise RuntimeError(
            "the model's parameters were created under torch.inference_mode() (inference tensors), which "
            "cannot take part in a backward; load or build the model outside inference_mode"
        )


def uses_activation_checkpointing(model: nn.Module) -> bool:
    base = base_model_of(model)
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # newer name first
        if isinstance(getattr(type(base), attr, None), property):
            return bool(getattr(base, attr))
    return False


@contextlib.contextmanager
def preserved_model_state(model: nn.Module):
    """Restore ``requires_grad`` of every parameter and ``training`` of every module on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def collect(
    model: nn.Module,
    loader: Iterable,
    *,
    target_modules=None,
    y_factor: str = "diag",
    max_samples: int | None = 256,
    loss_fn: Callable | None = None,
    progress: bool = True,
    adapter_name: str | None = None,
    targets: list[Target] | None = None,
    factors=None,
    reduce: str = "all",
    ranks: Mapping[str, int] | int | None = None,
    solve_cost: Callable | None = None,
    split_halves: bool | None = None,
) -> Statistics:
    """Run ``loader`` once through ``model`` and return the per-layer statistics (docs/design.md §3).

    ``loss_fn(outputs, batch) -> per-sequence losses [B]`` replaces the causal-LM loss for other
    models; it must return, for each sequence, the mean loss over its tokens.  It reads
    ``batch.labels``: token labels shaped like ``input_ids`` (-100 where ``attention_mask`` is 0),
    or labels of any other shape with one row per sequence, such as class ids ``[B]``.
    ``max_samples`` caps the number of sequences (None: the whole loader).
    ``factors`` (a collection of "G", "Y", "Z"; None: all three, so that the statistics serve
    every method) are what the pass accumulates; ``y_factor`` matters only when Y is among them.

    When ``torch.distributed`` is initialised (docs/design.md §6.5), each rank streams its own
    ``loader`` (its shard) and ``max_samples`` is global: the first ``max_samples`` sequences of
    the ranks' batches taken in turn (batch 0 of rank 0, of rank 1, ..., then batch 1 of each).
    ``reduce="all"`` (the default) sums every statistic onto every rank; ``reduce="owner"`` sums
    each input group onto the one rank that will solve it (by the method's ``solve_cost`` of an
    input group's :class:`~loradafast.planner.LayerShape` list, default one SVD per layer, at the
    LoRA ``ranks``: a number or a per-layer mapping, 8 when not given), and each rank's statistics then
    hold its own layers only (``stats.meta["owners"]`` maps every layer to its rank).  A rank that
    fails stops every rank with an error, not a hang.

    ``split_halves`` keeps, beside the totals, the sums of every second batch (``stats.half``), from
    which the solve measures how far two halves of the data agree on each layer's subspace
    (:mod:`loradafast.methods.stability`).  It costs memory, no arithmetic: the even and the odd
    batches add into their own sums.  None: on where three times the statistics fit the device's
    free memory (the totals, the odd half, and the even half the solve derives), off in a
    distributed run (not supported there yet).
    """
    factors = _checked_pass_arguments(reduce, factors, y_factor, max_samples)
    model = distributed.unwrap(model)
    targets, acc = _prepared(model, targets, target_modules=target_modules, adapter_name=adapter_name,
                             loss_fn=loss_fn, y_factor=y_factor, factors=factors, split_halves=split_halves)
    started = time.perf_counter()
    counts, checksum = _run_pass(model, loader, acc, loss_fn=loss_fn, max_samples=max_samples, progress=progress)
    stats = _reduced_statistics(model, acc, targets, counts, reduce=reduce, owners_by=(ranks, solve_cost),
                                factors=factors, y_factor=y_factor, loss_fn=loss_fn, adapter_name=adapter_name,
                                checksum=checksum, started=started)
    logger.info("collect: %d tokens in %d sequences, %d layers (%d input groups), y_factor=%s, %.1f s",
                stats.num_tokens, stats.num_sequences, len(stats.layers), len(stats.z_sums), y_factor,
                stats.meta["pass_seconds"])
    return stats


def _checked_pass_arguments(reduce: str, factors, y_factor: str, max_samples) -> frozenset:
    """``factors`` normalised, after the checks of the pass's own arguments: they fail before any
    layer is looked at."""
    if reduce not in ("all", "owner"):
        raise ValueError(f"reduce must be 'all' or 'owner', got {reduce!r}")
    factors = check_factors(factors)
    check_choice("y_factor", y_factor, Y_FACTORS)
    check_pass_options(max_samples)
    return factors


def _run_pass(model, loader, acc: Accumulator, *, loss_fn, max_samples, progress: bool) -> tuple[torch.Tensor, str]:
    """:func:`stream` with ``max_samples`` over every rank; returns the (tokens, sequences) counted
    as a float64 tensor on the statistics' device, and the data's fingerprint.  A rank that fails
    stops every rank with an error, not a hang."""
    num_sequences = num_tokens = 0
    error = None
    try:
        num_sequences, num_tokens, checksum = stream(model, loader, acc, loss_fn=loss_fn, max_samples=max_samples,
                                                     progress=progress and distributed.is_main(), global_cap=True)
    except Exception as e:  # noqa: BLE001 - every rank learns of it below, then it is raised
        error = e
    distributed.agree_on_failure(error, "the statistics pass")
    return torch.tensor([num_tokens, num_sequences], dtype=torch.float64, device=acc.device), checksum


def _reduced_statistics(model, acc: Accumulator, targets: list[Target], counts: torch.Tensor, *, reduce, owners_by,
                        factors, y_factor, loss_fn, adapter_name, checksum, started: float) -> Statistics:
    """The pass's sums, added up over the ranks (``reduce``) and checked, as :class:`Statistics` with
    their meta (``pass_seconds`` counted from ``started``) and, where the halves were kept, the odd half.
    ``owners_by``: the LoRA ranks and the solve cost that choose the owners with ``reduce="owner"``."""
    odd = acc.finish_halves()
    owners = _reduce_and_check(acc, targets, counts, reduce, *owners_by)
    meta = _meta(model, targets, acc, owners, loss_fn=loss_fn, adapter_name=adapter_name, checksum=checksum,
                 seconds=time.perf_counter() - started)
    stats = _statistics(acc, targets, counts, y_factor if "Y" in factors else None, meta, owners)
    if odd is not None:
        stats.half = _half(odd, stats, acc.half_counts[1])
    return stats


def _prepared(model, targets, *, target_modules, adapter_name, loss_fn, y_factor, factors,
              split_halves) -> tuple[list[Target], Accumulator]:
    """The layers to hook, checked, and their accumulator.  A check may fail on one rank alone (its
    own model or mode): every rank learns of it before any other collective."""
    error = None
    try:
        targets = checked_targets(model, targets, target_modules=target_modules, adapter_name=adapter_name,
                                  loss_fn=loss_fn)
    except Exception as e:  # noqa: BLE001 - raised below, on every rank
        error = e
    distributed.agree_on_failure(error, "the checks before the statistics pass")
    device = model_device(model)
    if split_halves is None:
        split_halves = _halves_fit(targets, factors, y_factor, device)
    elif split_halves and distributed.is_distributed():
        raise ValueError("split_halves=True is not supported in a distributed run yet; pass split_halves=False")
    return targets, Accumulator(targets, y_factor, device, factors, split_halves=split_halves)


def _meta(model, targets, acc: Accumulator, owners, *, loss_fn, adapter_name, checksum, seconds) -> dict:
    """The model, the pass and the provenance (:mod:`.provenance`) the statistics record."""
    meta = {
        "model_class": type(base_model_of(model)).__name__,
        "loradafast_version": __version__,
        "pass_seconds": seconds,
        **model_meta(model, targets, causal=loss_fn is None and is_causal_lm(model), adapter_name=adapter_name),
        "weight_samples": provenance.weight_samples(targets),
        # One rank's shard does not describe the data of a distributed pass.
        "data_fingerprint": None if distributed.is_distributed() else checksum,
    }
    if owners is not None:
        meta.update(owners=owners, input_groups={t.name: acc.input_group[t.name] for t in targets},
                    rank=distributed.rank(), world_size=distributed.world_size())
    return meta


def _halves_fit(targets: list[Target], factors, y_factor: str, device) -> bool:
    """``split_halves=None``: whether three times the statistics fit the device's free memory (an
    upper bound: each layer counted with a Z of its own)."""
    if distributed.is_distributed():
        return False
    budget, _ = planner.resolve_budget(None, device)
    shapes = [planner.LayerShape(t.name, t.in_features, t.out_features, t.name, 1) for t in targets]
    return budget is None or 3 * planner.statistics_bytes(shapes, factors, y_factor) <= budget


def _half(odd: tuple[dict, dict, dict], stats: Statistics, counts: list[int]) -> Statistics:
    """The odd batches' sums as statistics of the same layers (zeros where they reached none)."""
    g, y, z = odd

    def like(sums, key, total):
        return None if total is None else sums[key] if key in sums else torch.zeros_like(total)

    layers = {n: LayerStats(s.name, s.in_features, s.out_features, like(g, n, s.g_sum), like(y, n, s.y_sum),
                            s.input_group, s.kind) for n, s in stats.layers.items()}
    for s in layers.values():
        if s.y_sum is not None and s.y_sum.dim() == 2:
            kernels.symmetrize_lower_(s.y_sum)
    z_sums = {k: kernels.symmetrize_lower_(like(z, k, total)) for k, total in stats.z_sums.items()}
    return Statistics(layers, z_sums, counts[1], counts[0], stats.y_factor)


def checked_targets(model: nn.Module, targets, *, target_modules, adapter_name, loss_fn) -> list[Target]:
    """The layers to hook, after every check that can fail before the pass."""
    if targets is None:
        targets = find_targets(model, target_modules, adapter_name=adapter_name, allow_quantized=True)
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear or Conv1D layer of "
            f"{type(model).__name__}; check the module names with model.named_modules()"
        )
    _check_autograd_available(model)
    if uses_activation_checkpointing(model):
        raise ValueError(
            "the model recomputes activations during backward (gradient checkpointing), which would run the "
            "statistics hooks twice per batch; call model.gradient_checkpointing_disable() for the "
            "initialisation and enable it again afterwards"
        )
    if loss_fn is None and not is_causal_lm(model):
        raise ValueError(
            f"{type(base_model_of(model)).__name__} is not a causal language model; pass "
            "loss_fn=(outputs, batch) -> per-sequence mean losses [batch]"
        )
    return targets


def stream(model: nn.Module, loader: Iterable, acc: Accumulator, *, loss_fn, max_samples,
           progress: bool, global_cap: bool = False) -> tuple[int, int, str]:
    """Every batch through the hooked model (its state restored afterwards, adapters off);
    returns (sequences, tokens) used and the data's fingerprint (:mod:`.provenance`).
    ``global_cap``: ``max_samples`` over every rank (:class:`_Turns`)."""
    num_tokens = num_sequences = 0
    checksum = None
    handles, bar = [], None
    sharded = global_cap and distributed.is_distributed() and distributed.is_sharded(model)
    turns = None
    if global_cap and distributed.is_distributed() and (max_samples is not None or sharded):
        turns = _Turns(max_samples, strict=sharded)
    with preserved_model_state(model), base_model_only(model):  # PEFT adapters off: the base model's statistics
        try:
            model.eval()  # dropout off: statistics must not depend on the batching
            for p in model.parameters():
                p.requires_grad_(False)
            handles = [t.module.register_forward_hook(acc.forward_hook(t)) for t in acc.targets]
            bar = _progress.pass_bar(loader, max_samples, progress)
            batches = iter(loader)
            for index in itertools.count():
                if turns is not None:
                    batch = turns.next_batch(batches, index, num_sequences, loss_fn)
                else:
                    batch = _next_batch(batches, index, num_sequences, max_samples, loss_fn)
                if batch is END or (batch is None and turns is None):
                    break
                if batch is not None and batch.size:
                    sums = _checksum(batch).to(acc.device)
                    checksum = sums if checksum is None else checksum + sums
                    used = turns.run(_run_batch, model, batch.to(acc.device), acc, loss_fn) if turns else \
                        _run_batch(model, batch.to(acc.device), acc, loss_fn)
                    num_sequences += used[0]
                    num_tokens += used[1]
                    acc.count(*used)
                if bar is not None:
                    bar.update(batch.size if turns is None else turns.turn_total)
            if turns is not None and turns.error is not None:
                raise turns.error
        finally:
            for h in handles:
                h.remove()
            _progress.finish_bar(bar)
    return num_sequences, num_tokens, provenance.data_fingerprint(_total(checksum), num_sequences)


def _next_batch(batches, index: int, used: int, max_samples: int | None, loss_fn) -> Batch | None:
    """The loader's next batch, normalised and cut to the ``max_samples − used`` sequences still
    wanted; None at the end, or once the cap is reached (before the loader is asked for more)."""
    if max_samples is not None and used >= max_samples:
        return None
    raw = next(batches, END)
    if raw is END:
        return None
    batch = normalize_batch(raw, index=index, token_labels=loss_fn is None)
    return batch if max_samples is None else batch.take(max_samples - used)


def _checksum(batch: Batch) -> torch.Tensor:
    """The wrapped sum of the batch's sequence checksums, left on the batch's device."""
    return provenance.sequence_checksums(batch.inputs["input_ids"], batch.attention_mask, batch.labels).sum()


def _total(checksum: torch.Tensor | None) -> int:
    return 0 if checksum is None else int(checksum.item())


def data_fingerprint(loader: Iterable, *, max_samples: int | None, loss_fn=None) -> str:
    """The fingerprint a pass over ``loader`` would record (no model runs): the same batches,
    normalised and capped at ``max_samples`` sequences as the pass takes them."""
    checksum, used, batches = None, 0, iter(loader)
    for index in itertools.count():
        batch = _next_batch(batches, index, used, max_samples, loss_fn)
        if batch is None:
            break
        if batch.size:
            checksum = _checksum(batch) if checksum is None else checksum + _checksum(batch)
            used += int(_has_labels(batch, loss_fn).sum())  # the pass's count, which its cap reads
    return provenance.data_fingerprint(_total(checksum), used)


class _Turns:
    """A global ``max_samples`` over the ranks of a distributed run: the ranks take their batches
    in turns (batch i of rank 0, of rank 1, ..., then batch i + 1), so the cap takes the first
    ``max_samples`` sequences of that interleaved order whatever the shards' sizes.  Two small
    collectives per batch (the sequences used so far, then the next batch's size); an error on a
    rank is carried by them, so every rank leaves the loop at the same batch."""

    def __init__(self, max_samples: int | None, strict: bool = False):
        self.max_samples = float("inf") if max_samples is None else max_samples
        self.error, self.turn_total, self.strict = None, 0, strict

    def _gather(self, value: int) -> list[tuple[int, int]]:
        import torch.distributed as dist

        world, me = distributed.world_size(), distributed.rank()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        t = torch.zeros(world, 2, dtype=torch.int64, device=device)
        t[me, 0], t[me, 1] = value, int(self.error is not None)
        dist.all_reduce(t)
        return [tuple(row) for row in t.tolist()]

    def next_batch(self, batches, index: int, used: int, loss_fn):
        """This rank's share of turn ``index``: a batch (maybe of size 0), or ``END`` for every rank."""
        before = self._gather(used)
        if any(failed for _, failed in before) or sum(u for u, _ in before) >= self.max_samples:
            return END
        batch = None
        if self.error is None:
            try:
                raw = next(batches, END)
                batch = None if raw is END else normalize_batch(raw, index=index, token_labels=loss_fn is None)
            except Exception as e:  # noqa: BLE001 - raised after every rank left the loop
                self.error = e
        sizes = self._gather(-1 if batch is None else batch.size)
        if any(failed for _, failed in sizes) or all(size < 0 for size, _ in sizes):
            return END
        remaining = self.max_samples - sum(u for u, _ in before)
        takes = []
        for size, _ in sizes:
            takes.append(min(max(size, 0), max(remaining, 0)))
            remaining -= takes[-1]
        self.turn_total = sum(takes)  # the progress bar (rank 0) counts every rank's sequences
        if self.strict and 0 in takes and any(takes):
            # A sharded model (FSDP2) gathers its weights in every forward: all ranks or none.
            self.error = ValueError(
                f"the model is sharded (FSDP2), whose every forward is a collective, but the ranks would run "
                f"{sum(t > 0 for t in takes)} of {len(takes)} forwards in this turn (uneven shards, or max_samples "
                "ending mid-turn); give every rank the same number of batches, and a max_samples that is a multiple "
                "of the world size times the batch size (or None)")
            return END
        return None if batch is None else batch.take(takes[distributed.rank()])

    def run(self, fn, *args):
        """``fn(*args)``, an error kept for the next turn to tell the other ranks."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - raised after every rank left the loop
            self.error = e
            return 0, 0


def _reduce_and_check(acc: Accumulator, targets: list[Target], counts: torch.Tensor, reduce: str,
                      ranks, solve_cost) -> dict[str, int] | None:
    """Sum over the ranks of a distributed run (to every rank, or each layer to its owner), then
    refuse empty or non-finite statistics; returns the owners (layer → rank) with ``reduce="owner"``."""
    distributed_run = distributed.is_distributed()
    owners = None
    if distributed_run and reduce == "owner":
        # Before any check that could raise on one rank only: every rank must join every collective.
        agree_on_layers(acc, targets, counts)
        owners = _owners(acc, targets, ranks, solve_cost)
        reduce_to_owners(acc, targets, counts, owners)
    elif distributed_run:
        all_reduce(acc, targets, counts)
    if counts[1].item() == 0:
        raise ValueError(
            f"the loader yielded no sequence with a label to learn from{' on any rank' if distributed_run else ''} "
            "(empty loader, or every token masked with -100); pass samples with at least two unmasked "
            "tokens each"
        )
    error = None
    sums = [*acc.g_sum.values(), *acc.y_sum.values(), *acc.z_sum.values()]
    if not all(finite_flags(sums)):
        error = FloatingPointError(
            "non-finite values in the statistics (NaN/Inf activations or gradients); check the model "
            "in fp32, or lower the learning-rate-free scale of the inputs"
        )
    if owners is not None:  # each rank checked only its own layers
        distributed.agree_on_failure(error, "the check of the reduced statistics")
    elif error is not None:
        raise error
    return owners


def _owners(acc: Accumulator, targets: list[Target], ranks, solve_cost) -> dict[str, int]:
    """Layer → the rank that solves it: whole input groups, balanced by estimated solve cost."""
    shapes = [planner.LayerShape(t.name, t.in_features, t.out_features, acc.input_group.get(t.name, t.name),
                                 ranks if isinstance(ranks, int) else (ranks or {}).get(t.name, 8))
              for t in targets]
    groups = planner.assign_owners(shapes, distributed.world_size(), solve_cost)
    return {s.name: groups[s.input_group] for s in shapes}


def _statistics(acc: Accumulator, targets: list[Target], counts: torch.Tensor, y_factor: str,
                meta: dict, owners: dict[str, int] | None = None) -> Statistics:
    layers = {}
    for t in targets:
        if t.name not in acc.got_grad:  # the same on every rank: agreed on before the reduction
            raise RuntimeError(
                f"layer {t.name!r} received no gradient: it does not influence the loss. Exclude it "
                "with target_modules"
            )
    me = distributed.rank()
    for t in targets:
        if owners is not None and owners[t.name] != me:
            continue
        y = acc.y_sum.get(t.name)
        if y is not None and y_factor == "full":
            y = kernels.symmetrize_lower_(y)
        layers[t.name] = LayerStats(t.name, t.in_features, t.out_features, acc.g_sum.get(t.name), y,
                                    acc.input_group[t.name], t.kind)
    # The accumulators hold lower triangles only (the kernels skip the upper tiles); mirrored in
    # place, so the peak is one diagonal tile more than the statistics, not twice Z and full Y.
    z_sums = {k: kernels.symmetrize_lower_(v) for k, v in acc.z_sum.items()}
    return Statistics(layers, z_sums, int(counts[0].item()), int(counts[1].item()), y_factor, meta)


def _context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _takes_position_ids(model: nn.Module) -> bool:
    base = base_model_of(model)
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    if "position_ids" not in parameters:
        return False
    # The RoBERTa family numbers positions from input_ids itself, skipping pads and starting after
    # padding_idx: already independent of the padding, and 0-based ids would be wrong for it.
    return not any(hasattr(m, "create_position_ids_from_input_ids") for m in base.modules())


def _derived_position_ids(model: nn.Module, batch: Batch) -> torch.Tensor | None:
    """Position ids counted over the real tokens, as generation derives them, for a batch that has
    padding before a token (left padding).  A model with absolute positions numbers such a
    sequence from its first pad, so the statistics would depend on the padding.  Right-padded
    batches, batches that bring position_ids and models whose forward takes none are left as they are.
    """
    if "position_ids" in batch.inputs:
        return None
    real = (batch.attention_mask != 0).long()
    if not (real[:, 1:] > real[:, :-1]).any() or not _takes_position_ids(model):
        return None
    return (real.cumsum(-1) - 1).clamp(min=0)


def _has_labels(batch: Batch, loss_fn) -> torch.Tensor:
    """Which sequences the loss learns from ([B] bool), known before the forward: the causal-LM
    loss's labels alone decide it; a user's loss_fn takes every sequence."""
    if loss_fn is None:
        return (next_token_labels(batch) != IGNORE_INDEX).any(1)
    return torch.ones(batch.size, dtype=torch.bool, device=batch.attention_mask.device)


def _run_batch(model: nn.Module, batch: Batch, acc: Accumulator, loss_fn) -> tuple[int, int]:
    """Forward and backward one batch; returns (sequences used, tokens used)."""
    inputs = dict(batch.inputs)
    config = getattr(base_model_of(model), "config", None)
    context = _context_length(config)
    length = batch.attention_mask.shape[1]
    if context is not None and length > context:
        raise ValueError(
            f"a batch has sequences of {length} tokens but the model's context is {context}; truncate the "
            f"samples to at most {context} tokens (tokenizer(..., truncation=True, max_length={context}))"
        )
    if config is not None and hasattr(config, "use_cache"):
        inputs.setdefault("use_cache", False)  # a KV cache is dead weight in this pass
    position_ids = _derived_position_ids(model, batch)
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    with torch.enable_grad():
        has_labels = _has_labels(batch, loss_fn)
        mask = (batch.attention_mask != 0) & has_labels[:, None]
        acc.start_batch(mask.to(torch.float32))
        try:
            outputs = model(**inputs)
            if loss_fn is None:
                losses, _ = causal_lm_sequence_losses(outputs, batch)
            else:
                losses = loss_fn(outputs, batch)
                if not torch.is_tensor(losses) or losses.shape != (batch.size,):
                    raise ValueError(
                        f"loss_fn must return one mean loss per sequence, shape ({batch.size},); got "
                        f"{getattr(losses, 'shape', type(losses))}"
                    )
            total = losses.sum()
            if not torch.isfinite(total):
                raise FloatingPointError(
                    "the loss is not finite on this batch; check the inputs and the model's dtype"
                )
            if total.requires_grad:
                total.backward()
            acc.flush_pending()
        finally:
            acc.end_batch()
    return int(has_labels.sum().item()), int(mask.sum().item())
