"""The statistics pass: one streaming forward+backward per batch, with hooks (DESIGN §3).

For each target layer with input ``x_t`` and output gradient ``g_t = ∂ℓ_n/∂y_t`` (``ℓ_n`` the mean
token loss of sequence n), accumulate in fp32

* ``Σ g_t x_tᵀ`` (G, the weight gradient, never materialised as ``.grad``),
* ``Σ x_t x_tᵀ`` once per distinct input tensor (Z, shared by q/k/v, gate/up),
* ``Σ g_t²`` or ``Σ g_t g_tᵀ`` (Y, diag or full),

over the valid tokens (attention mask, sequences that have at least one label).

The pass leaves the model as it found it: parameters' ``requires_grad``, train/eval modes and
hooks are restored even when it fails.  It never needs a parameter to require grad: every target
output passes through an identity Function that also takes a leaf requiring grad (the anchor), so
autograd reaches every target however frozen the model is, and the Function's backward records
the output gradient (see ``_CaptureGrad`` for why that is a copy).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .. import kernels
from ..options import Y_FACTORS, check_choice, check_pass_options
from .batches import IGNORE_INDEX, Batch, normalize_batch
from .losses import causal_lm_sequence_losses, next_token_labels
from .store import LayerStats, Statistics
from ..targets import Target, base_model_of, base_model_only, find_targets, model_meta

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


class _CaptureGrad(torch.autograd.Function):
    """Identity on a target's output whose backward hands ``∂loss/∂output`` to ``record``.

    The output gradient cannot be taken from a tensor hook on the output itself: the next op may
    modify the output in place (``nn.ReLU(inplace=True)``), which moves the hook off the gradient
    path, or fails outright when the output was made a leaf.  The identity returns a copy, since
    autograd forbids in-place ops on a view returned by a custom Function.  The copy adds no saved
    activation (the layer's own output is not kept for backward) and costs one memcpy per target.
    """

    @staticmethod
    def forward(ctx, output, anchor, record):
        ctx.record = record
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.record(grad)
        return grad, None, None


class _Accumulator:
    """Hook state for one pass."""

    def __init__(self, targets: list[Target], y_factor: str, device: torch.device):
        self.targets = targets
        # Makes every captured output require grad, even in a model whose parameters are all frozen.
        self.anchor = torch.zeros(0, device=device, requires_grad=True)
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
            return _CaptureGrad.apply(output, self.anchor, self._grad_hook(target))

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


def _all_reduce(acc: _Accumulator, targets: list[Target], counts: torch.Tensor) -> None:
    """Sum the statistics and ``counts`` over the ranks, in place.

    Every rank takes part in the same collectives in the same order (sorted layer names), also a
    rank whose shard was empty or on which a layer never ran: it first learns from the others which
    layers got a gradient and which layers share an input, then contributes zeros shaped by the
    target layers.
    """
    import torch.distributed as dist

    dist.all_reduce(counts)
    names = sorted(t.name for t in targets)
    _agree_on_layers(acc, names, counts.device)
    for name in names:
        if name not in acc.g_sum:
            continue
        dist.all_reduce(acc.g_sum[name])
        dist.all_reduce(acc.y_sum[name])
    for leader in sorted(acc.z_sum):
        dist.all_reduce(acc.z_sum[leader])


def _agree_on_layers(acc: _Accumulator, names: list[str], device: torch.device) -> None:
    """Make ``acc`` hold the same layers and input groups on every rank, zeros where it saw none."""
    import torch.distributed as dist

    n = len(names)
    index = {name: i for i, name in enumerate(names)}
    leader = [index[acc.z_key[name]] if name in acc.z_key else None for name in names]
    # One MAX reduction gives, per layer, the highest and (negated) lowest index of its input group's
    # leader over the ranks that ran it, and whether any rank got a gradient for it.
    flags = torch.tensor([-1 if i is None else i for i in leader]
                         + [-n if i is None else -i for i in leader]
                         + [int(name in acc.g_sum) for name in names], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    highest, lowest, got_grad = flags[:n].tolist(), (-flags[n:2 * n]).tolist(), flags[2 * n:].tolist()
    by_name = {t.name: t for t in acc.targets}
    for i, name in enumerate(names):
        if highest[i] < 0:
            continue  # the layer ran on no rank: reported as receiving no gradient
        if highest[i] != lowest[i]:
            raise RuntimeError(
                f"layer {name!r} shares its input with different layers on different ranks; the ranks must "
                "run the same model"
            )
        acc.z_key[name] = names[highest[i]]
        target = by_name[name]
        if got_grad[i] and name not in acc.g_sum:
            _zero_sums(acc, target)
        if highest[i] == i and name not in acc.z_sum:
            acc.z_sum[name] = torch.zeros(target.in_features, target.in_features, dtype=torch.float32,
                                          device=target.module.weight.device)


def _zero_sums(acc: _Accumulator, target: Target) -> None:
    out, inp, device = target.out_features, target.in_features, target.module.weight.device
    acc.g_sum[target.name] = torch.zeros(out, inp, dtype=torch.float32, device=device)
    y_shape = (out,) if acc.y_factor == "diag" else (out, out)
    acc.y_sum[target.name] = torch.zeros(y_shape, dtype=torch.float32, device=device)


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
    models; it must return, for each sequence, the mean loss over its tokens.  It reads
    ``batch.labels``: token labels shaped like ``input_ids`` (-100 where ``attention_mask`` is 0),
    or labels of any other shape with one row per sequence, such as class ids ``[B]``.
    ``max_samples`` caps the number of sequences (None: the whole loader).
    """
    check_choice("y_factor", y_factor, Y_FACTORS)
    check_pass_options(max_samples)
    if targets is None:
        targets = find_targets(model, target_modules, adapter_name=adapter_name)
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear or Conv1D layer of "
            f"{type(model).__name__}; check the module names with model.named_modules()"
        )
    _check_autograd_available(model)
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
                batch = normalize_batch(raw, index=index, token_labels=loss_fn is None)
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

    counts = torch.tensor([num_tokens, num_sequences], dtype=torch.float64, device=device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        # Before any check that could raise on one rank only: every rank must join every collective.
        _all_reduce(acc, targets, counts)
    if counts[1].item() == 0:
        raise ValueError(
            f"the loader yielded no sequence with a label to learn from{' on any rank' if distributed else ''} "
            "(empty loader, or every token masked with -100); pass samples with at least two unmasked "
            "tokens each"
        )
    for t in [*acc.g_sum.values(), *acc.y_sum.values(), *acc.z_sum.values()]:
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
    from .. import __version__

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
    position_ids = _derived_position_ids(model, batch)
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    with torch.enable_grad():
        if loss_fn is None:
            # The mask is only known after the loss tells which sequences have labels; the
            # labels alone decide that, so compute it before the forward.
            has_labels = (next_token_labels(batch) != IGNORE_INDEX).any(1)
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
