"""The statistics pass: one streaming forward+backward per batch, with hooks (DESIGN §3).

For each target layer with input ``x_t`` and output gradient ``g_t = ∂ℓ_n/∂y_t`` (``ℓ_n`` the mean
token loss of sequence n), accumulate in fp32

* ``Σ g_t x_tᵀ`` (G, the weight gradient, never materialised as ``.grad``),
* ``Σ x_t x_tᵀ`` once per distinct input tensor (Z, shared by q/k/v, gate/up),
* ``Σ g_t²`` or ``Σ g_t g_tᵀ`` (Y, diag or full),

over the valid tokens (attention mask, sequences that have at least one label).

The pass leaves the model as it found it: parameters' ``requires_grad``, train/eval modes and
hooks are restored even when it fails.  It never needs a parameter to require grad: the first
target output on the gradient path becomes a leaf that does, which is all autograd needs to
reach every target (nothing upstream of it contains a target).
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import kernels
from .batches import Batch, normalize_batch
from .losses import causal_lm_sequence_losses
from .stats import LayerStats, Statistics
from .targets import Target, base_model_of, base_model_only, find_targets, model_meta

Y_FACTORS = ("diag", "full")


def is_causal_lm(model: nn.Module) -> bool:
    base = base_model_of(model)
    config = getattr(base, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    name = type(base).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _uses_activation_checkpointing(model: nn.Module) -> bool:
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


class _Accumulator:
    """Hook state for one pass."""

    def __init__(self, targets: list[Target], y_factor: str, device: torch.device):
        self.targets = targets
        self.y_factor = y_factor
        self.device = device
        self.g_sum: dict[str, torch.Tensor] = {}
        self.y_sum: dict[str, torch.Tensor] = {}
        self.z_sum: dict[str, torch.Tensor] = {}
        self.z_key: dict[str, str] = {}  # layer -> leader of its input-sharing group
        self.first_batch = True
        # Per-batch state.
        self.mask: torch.Tensor | None = None  # [B*S] float 0/1
        self.inputs: dict[str, torch.Tensor] = {}  # layer -> its input rows [B*S, in]
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input tensor) -> (tensor, leader)
        self.calls: dict[str, int] = {}
        self.errors: list[BaseException] = []

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1)
        self.inputs.clear()
        self.seen.clear()
        self.calls.clear()

    def end_batch(self) -> None:
        self.inputs.clear()
        self.seen.clear()
        self.mask = None
        self.first_batch = False

    def _rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        rows = t.reshape(-1, t.shape[-1])
        if rows.shape[0] != self.mask.shape[0]:
            raise RuntimeError(
                f"layer {name!r} sees {rows.shape[0]} token rows but the batch has {self.mask.shape[0]} tokens; "
                "loradafast needs layers whose inputs are [batch, seq, features] aligned with input_ids "
                "(exclude this layer with target_modules)"
            )
        return rows

    def forward_hook(self, target: Target):
        name = target.name

        def hook(module, args, output):
            if self.mask is None:  # a forward outside the pass (should not happen while hooks live)
                return None
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1:
                raise RuntimeError(
                    f"layer {name!r} is called more than once per forward pass (shared or reused module); "
                    "this is not supported: exclude it with target_modules"
                )
            x = args[0] if args else None
            if not torch.is_tensor(x):
                raise RuntimeError(f"layer {name!r} was called without a tensor input")
            leader = self._group_leader(name, x)
            rows = self._rows(name, x.detach())
            self.inputs[name] = rows
            if leader == name:
                acc = self.z_sum.get(name)
                if acc is None:
                    acc = self.z_sum[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32,
                                                         device=rows.device)
                kernels.kfac_accumulate(acc, rows, self.mask)
            replaced = None
            if not output.requires_grad:
                output = replaced = output.detach().requires_grad_(True)
            output.register_hook(self._grad_hook(target))
            return replaced

        return hook

    def _group_leader(self, name: str, x: torch.Tensor) -> str:
        hit = self.seen.get(id(x))
        leader = hit[1] if hit is not None and hit[0] is x else name
        if hit is None:
            self.seen[id(x)] = (x, name)
        if self.first_batch:
            self.z_key[name] = leader
        elif self.z_key.get(name) != leader:
            raise RuntimeError(
                f"layer {name!r} shared its input with {self.z_key.get(name)!r} in the first batch but with "
                f"{leader!r} now; input sharing must not change between batches"
            )
        return leader

    def _grad_hook(self, target: Target):
        name = target.name

        def hook(grad):
            x = self.inputs.get(name)
            if x is None:
                return None
            g = self._rows(name, grad)
            acc = self.g_sum.get(name)
            if acc is None:
                acc = self.g_sum[name] = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float32, device=g.device)
            kernels.gradient_accumulate(acc, g, x, self.mask)
            y = self.y_sum.get(name)
            if self.y_factor == "diag":
                if y is None:
                    y = self.y_sum[name] = torch.zeros(g.shape[1], dtype=torch.float32, device=g.device)
                kernels.diag_accumulate(y, g, self.mask)
            else:
                if y is None:
                    y = self.y_sum[name] = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float32, device=g.device)
                kernels.kfac_accumulate(y, g, self.mask)
            return None

        return hook


def _all_reduce(tensors: Iterable[torch.Tensor]) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)


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
) -> Statistics:
    """Run ``loader`` once through ``model`` and return the per-layer statistics (DESIGN §3).

    ``loss_fn(outputs, batch) -> per-sequence losses [B]`` replaces the causal-LM loss for other
    models; it must return, for each sequence, the mean loss over its tokens.
    ``max_samples`` caps the number of sequences (None: the whole loader).
    """
    if y_factor not in Y_FACTORS:
        raise ValueError(f"y_factor must be one of {Y_FACTORS}, got {y_factor!r}")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be a positive number of sequences, got {max_samples}")
    if targets is None:
        targets = find_targets(model, target_modules, adapter_name=adapter_name)
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear or Conv1D layer of "
            f"{type(model).__name__}; check the module names with model.named_modules()"
        )
    if _uses_activation_checkpointing(model):
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
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    acc = _Accumulator(targets, y_factor, device)
    num_tokens = 0
    num_sequences = 0
    started = time.perf_counter()
    handles = []
    bar = None
    with preserved_model_state(model), base_model_only(model):  # PEFT adapters off: the base model's statistics
        try:
            model.eval()  # dropout off: statistics must not depend on the batching
            for p in model.parameters():
                p.requires_grad_(False)
            handles = [t.module.register_forward_hook(acc.forward_hook(t)) for t in targets]
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=max_samples, unit="seq", desc="loradafast: statistics pass", leave=False)
            batches = iter(loader)
            for index in itertools.count():
                if max_samples is not None and num_sequences >= max_samples:
                    break
                try:
                    raw = next(batches)
                except StopIteration:
                    break
                batch = normalize_batch(raw, index=index)
                if max_samples is not None:
                    batch = batch.take(max_samples - num_sequences)
                batch = batch.to(device)
                used = _run_batch(model, batch, acc, loss_fn)
                num_sequences += used[0]
                num_tokens += used[1]
                if bar is not None:
                    bar.update(batch.size)
        finally:
            for h in handles:
                h.remove()
            if bar is not None:
                bar.close()

    if num_sequences == 0:
        raise ValueError(
            "the loader yielded no sequence with a label to learn from (empty loader, or every token "
            "masked with -100); pass samples with at least two unmasked tokens each"
        )
    counts = torch.tensor([num_tokens, num_sequences], dtype=torch.float64, device=device)
    sums = [*acc.g_sum.values(), *acc.y_sum.values(), *acc.z_sum.values()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _all_reduce([*sums, counts])
    for t in sums:
        if not torch.isfinite(t).all():
            raise FloatingPointError(
                "non-finite values in the statistics (NaN/Inf activations or gradients); check the model "
                "in fp32, or lower the learning-rate-free scale of the inputs"
            )

    layers = {}
    for t in targets:
        if t.name not in acc.g_sum:
            raise RuntimeError(
                f"layer {t.name!r} received no gradient: it does not influence the loss. Exclude it "
                "with target_modules"
            )
        y = acc.y_sum[t.name]
        layers[t.name] = LayerStats(
            t.name, t.in_features, t.out_features, acc.g_sum[t.name],
            kernels.symmetric_from_lower(y) if y_factor == "full" else y, acc.z_key[t.name], t.kind,
        )
    # The accumulators hold lower triangles only (the kernels skip the upper tiles).
    z_sums = {k: kernels.symmetric_from_lower(v) for k, v in acc.z_sum.items()}
    from . import __version__

    meta = {
        "model_class": type(base_model_of(model)).__name__,
        "loradafast_version": __version__,
        "pass_seconds": time.perf_counter() - started,
        **model_meta(model, targets, causal=loss_fn is None and is_causal_lm(model), adapter_name=adapter_name),
    }
    return Statistics(layers, z_sums, int(counts[0].item()), int(counts[1].item()), y_factor, meta)


def _context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _run_batch(model: nn.Module, batch: Batch, acc: _Accumulator, loss_fn) -> tuple[int, int]:
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
    with torch.enable_grad():
        if loss_fn is None:
            # The mask is only known after the loss tells which sequences have labels; the
            # labels alone decide that, so compute it before the forward.
            has_labels = (batch.labels[:, 1:] != -100).any(1)
        else:
            has_labels = torch.ones(batch.size, dtype=torch.bool, device=batch.attention_mask.device)
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
        finally:
            acc.end_batch()
    return int(has_labels.sum().item()), int(mask.sum().item())
