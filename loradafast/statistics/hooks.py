"""The hooks of the statistics pass and what they accumulate (docs/design.md §3).

A forward hook on each target layer keeps its input rows and adds ``Σ x xᵀ`` once per distinct
input tensor (Z, shared by the layers that read it); the output passes through
:func:`capture_grad`, whose backward hands the output gradient to the layer's gradient hook,
which adds ``Σ g xᵀ`` (G) and ``Σ g²`` or ``Σ g gᵀ`` (Y).  With the full Y, the Z of an input
group is added in the backward of its first layer too, so that one launch adds Z and that
layer's Y (:func:`loradafast.kernels.kfac_accumulate_pair`).

Only the requested ``factors`` are accumulated: a factor left out costs no kernel launch and no
accumulator (a G-only pass keeps no K-FAC state at all).
"""
from __future__ import annotations

import torch

from .. import kernels
from ..targets import Target


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


def capture_grad(output: torch.Tensor, anchor: torch.Tensor, record) -> torch.Tensor:
    """``output`` (a copy) on the gradient path, ``record(∂loss/∂output)`` called in the backward."""
    return _CaptureGrad.apply(output, anchor, record)


class Accumulator:
    """Hook state for one pass."""

    def __init__(self, targets: list[Target], y_factor: str, device: torch.device, factors=frozenset("GYZ"),
                 split_halves: bool = False):
        self.targets = targets
        self.factors = frozenset(factors)
        # Makes every captured output require grad, even in a model whose parameters are all frozen.
        self.anchor = torch.zeros(0, device=device, requires_grad=True)
        self.y_factor = y_factor
        self.device = device
        self.g_sum: dict[str, torch.Tensor] = {}
        self.y_sum: dict[str, torch.Tensor] = {}
        self.z_sum: dict[str, torch.Tensor] = {}
        self.got_grad: set[str] = set()  # layers whose output received a gradient
        self.input_group: dict[str, str] = {}  # layer -> leader of its input-sharing group
        self.first_batch = True
        # Per-batch state.
        self.mask: torch.Tensor | None = None  # [B*S] float 0/1
        self.kernel_mask: torch.Tensor | None = None  # the mask, or None where every token counts
        self.inputs: dict[str, torch.Tensor] = {}  # layer -> its input rows [B*S, in]
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input tensor) -> (tensor, leader)
        self.calls: dict[str, int] = {}
        # Full Y: input groups whose Z waits for the backward of their first layer (one launch with its Y).
        self.z_pending: set[str] = set()
        # Split halves: even and odd batches add into their own sums (the g_sum, y_sum and z_sum
        # above point at the current batch's), so the halves cost memory, not arithmetic;
        # finish_halves() adds the odd ones into the even ones, which become the totals.
        self.halves = [(self.g_sum, self.y_sum, self.z_sum), ({}, {}, {})] if split_halves else None
        self.half_counts = [[0, 0], [0, 0]]  # [sequences, tokens] of the even and of the odd batches
        self.batches = self.parity = 0

    def start_batch(self, mask: torch.Tensor) -> None:
        self.parity = self.batches % 2
        self.batches += 1
        if self.halves is not None:
            self.g_sum, self.y_sum, self.z_sum = self.halves[self.parity]
        self.mask = mask.reshape(-1)
        # Without padding the kernels need no mask: on CPU masking copies both operands of every
        # product, which one test per batch saves (measured: benchmarks/README.md, "Where the
        # statistics pass spent its time").
        self.kernel_mask = None if bool(self.mask.all()) else self.mask
        self.inputs.clear()
        self.seen.clear()
        self.calls.clear()

    def count(self, sequences: int, tokens: int) -> None:
        """What the current batch added, for its half's counts."""
        self.half_counts[self.parity][0] += sequences
        self.half_counts[self.parity][1] += tokens

    def finish_halves(self) -> tuple[dict, dict, dict] | None:
        """After the last batch: the totals in g_sum, y_sum and z_sum, and the odd batches' sums
        returned (None without halves, or with fewer than two batches)."""
        if self.halves is None:
            return None
        (g, y, z), odd = self.halves
        self.g_sum, self.y_sum, self.z_sum = g, y, z
        for total, part in zip((g, y, z), odd):
            for key, t in part.items():
                if key in total:
                    total[key] += t
                else:  # a layer reached in odd batches only
                    total[key] = t.clone()
        self.halves = None
        return odd if self.batches > 1 else None

    def flush_pending(self) -> None:
        """Add the Z of input groups whose first layer got no backward in this batch."""
        for name in sorted(self.z_pending):
            kernels.kfac_accumulate(self.z_sum[name], self.inputs[name], self.kernel_mask)
        self.z_pending.clear()

    def end_batch(self) -> None:
        self.z_pending.clear()
        self.inputs.clear()
        self.seen.clear()
        self.mask = self.kernel_mask = None
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
            if self.keeps_inputs:
                self.inputs[name] = rows  # read in the backward; otherwise not kept alive
            if leader == name and "Z" in self.factors:
                self._add_z(name, rows)
            return capture_grad(output, self.anchor, self._grad_hook(target))

        return hook

    @property
    def keeps_inputs(self) -> bool:
        """Whether the forward hooks keep each layer's input rows until its backward (held
        beside the activations autograd saves: the memory planner counts them)."""
        return "G" in self.factors or self._pairs_z_with_y

    @property
    def _pairs_z_with_y(self) -> bool:
        return self.y_factor == "full" and {"Y", "Z"} <= self.factors

    def _add_z(self, name: str, rows: torch.Tensor) -> None:
        acc = self.z_sum.get(name)
        if acc is None:
            acc = self.z_sum[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
        if self._pairs_z_with_y:
            self.z_pending.add(name)  # added with this layer's Y in its backward, or by flush_pending
        else:
            kernels.kfac_accumulate(acc, rows, self.kernel_mask)

    def _group_leader(self, name: str, x: torch.Tensor) -> str:
        hit = self.seen.get(id(x))
        leader = hit[1] if hit is not None and hit[0] is x else name
        if hit is None:
            self.seen[id(x)] = (x, name)
        if self.first_batch:
            self.input_group[name] = leader
        elif self.input_group.get(name) != leader:
            raise RuntimeError(
                f"layer {name!r} shared its input with {self.input_group.get(name)!r} in the first batch but with "
                f"{leader!r} now; input sharing must not change between batches"
            )
        return leader

    def _grad_hook(self, target: Target):
        name = target.name

        def hook(grad):
            if self.mask is None or self.calls.get(name) is None:
                return None
            g = self._rows(name, grad)
            self.got_grad.add(name)
            x = self.inputs.get(name)
            if "G" in self.factors:
                acc = self.g_sum.get(name)
                if acc is None:
                    acc = self.g_sum[name] = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float32, device=g.device)
                kernels.gradient_accumulate(acc, g, x, self.kernel_mask)
            if "Y" in self.factors:
                self._add_y(name, g, x)
            return None

        return hook

    def _add_y(self, name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        y = self.y_sum.get(name)
        if self.y_factor == "diag":
            if y is None:
                y = self.y_sum[name] = torch.zeros(g.shape[1], dtype=torch.float32, device=g.device)
            kernels.diag_accumulate(y, g, self.kernel_mask)
            return
        if y is None:
            y = self.y_sum[name] = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float32, device=g.device)
        if name in self.z_pending:  # this layer leads its input group: Z and Y in one launch
            self.z_pending.discard(name)
            kernels.kfac_accumulate_pair(self.z_sum[name], x, y, g, self.kernel_mask)
        else:
            kernels.kfac_accumulate(y, g, self.kernel_mask)


def all_reduce(acc: Accumulator, targets: list[Target], counts: torch.Tensor) -> None:
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
        for sums in (acc.g_sum, acc.y_sum):  # holds every layer that got a gradient, or none (not collected)
            if name in sums:
                dist.all_reduce(sums[name])
    for leader in sorted(acc.z_sum):
        dist.all_reduce(acc.z_sum[leader])


def _agree_on_layers(acc: Accumulator, names: list[str], device: torch.device) -> None:
    """Make ``acc`` hold the same layers and input groups on every rank, zeros where it saw none."""
    import torch.distributed as dist

    n = len(names)
    index = {name: i for i, name in enumerate(names)}
    leader = [index[acc.input_group[name]] if name in acc.input_group else None for name in names]
    # One MAX reduction gives, per layer, the highest and (negated) lowest index of its input group's
    # leader over the ranks that ran it, and whether any rank got a gradient for it.
    flags = torch.tensor([-1 if i is None else i for i in leader]
                         + [-n if i is None else -i for i in leader]
                         + [int(name in acc.got_grad) for name in names], dtype=torch.int64, device=device)
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
        acc.input_group[name] = names[highest[i]]
        target = by_name[name]
        if got_grad[i] and name not in acc.got_grad:
            _zero_sums(acc, target)
        if highest[i] == i and name not in acc.z_sum and "Z" in acc.factors:
            acc.z_sum[name] = torch.zeros(target.in_features, target.in_features, dtype=torch.float32,
                                          device=target.module.weight.device)


def _zero_sums(acc: Accumulator, target: Target) -> None:
    out, inp, device = target.out_features, target.in_features, target.module.weight.device
    acc.got_grad.add(target.name)
    if "G" in acc.factors:
        acc.g_sum[target.name] = torch.zeros(out, inp, dtype=torch.float32, device=device)
    if "Y" in acc.factors:
        y_shape = (out,) if acc.y_factor == "diag" else (out, out)
        acc.y_sum[target.name] = torch.zeros(y_shape, dtype=torch.float32, device=device)


# Bucket size of the reductions to the owners: large enough that a collective's latency is
# amortised, small enough that the flat copy it needs is a transient of no account.
BUCKET_BYTES = 64 * 2**20


def reduce_to_owners(acc: Accumulator, targets: list[Target], counts: torch.Tensor, owners: dict[str, int]) -> None:
    """Sum each layer's statistics over the ranks onto the rank that solves it (``owners``: layer
    → rank), and drop the other layers' sums from ``acc``; the counts go to every rank.

    As :func:`all_reduce`, every rank first learns which layers exist and share inputs.  Then, per
    owner in rank order, the sums it owns (G and Y per layer in name order, then Z per input
    group in name order) are reduced in buckets of about :data:`BUCKET_BYTES` (one flat buffer per
    bucket; a tensor larger than a bucket is reduced in place on its own).  The sums of a layer a
    rank does not own are freed as soon as they are sent.
    """
    import torch.distributed as dist

    me = dist.get_rank()
    for owner in range(dist.get_world_size()):
        mine = sorted(n for n in owners if owners[n] == owner)
        tensors = [(sums, n) for n in mine for sums in (acc.g_sum, acc.y_sum) if n in sums]
        tensors += [(acc.z_sum, k) for k in sorted({acc.input_group[n] for n in mine}) if k in acc.z_sum]
        for bucket in _buckets([sums[key] for sums, key in tensors]):
            _reduce_bucket(bucket, owner)
        if owner != me:
            for sums, key in tensors:
                del sums[key]


def agree_on_layers(acc: Accumulator, targets: list[Target], counts: torch.Tensor) -> None:
    """The counts summed on every rank, and the same layers and input groups on every rank."""
    import torch.distributed as dist

    dist.all_reduce(counts)
    _agree_on_layers(acc, sorted(t.name for t in targets), counts.device)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out, current, size = [], [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > BUCKET_BYTES:
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    return out + ([current] if current else [])


def _reduce_bucket(bucket: list[torch.Tensor], owner: int) -> None:
    import torch.distributed as dist

    if len(bucket) == 1:
        dist.reduce(bucket[0], dst=owner)
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.reduce(flat, dst=owner)
    if dist.get_rank() == owner:
        for t, piece in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(piece.view_as(t))
