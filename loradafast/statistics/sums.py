"""Per-layer statistics of one collect pass (docs/design.md §3), stored as fp32 sums plus counts.

A pass may collect only some of the factors G, Y and Z (``collect(..., factors=...)``: LoRA-GA and
LoRA-One need G only); the others are then None, and asking for one says how to collect it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FACTORS = ("G", "Y", "Z")
# Version 2 may leave factors out; version 1 files always hold all three and are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HALF_PREFIX = "half/"  # the kept half's sums, beside the totals (same layers, same factors)


def check_factors(factors) -> frozenset:
    """``factors`` (an iterable of "G", "Y", "Z"; None: all three) as a non-empty frozenset."""
    chosen = frozenset(FACTORS if factors is None else factors)
    if isinstance(factors, str) or not chosen or not chosen <= set(FACTORS):
        raise ValueError(f"factors must be a non-empty collection of {FACTORS} (None: all), got {factors!r}")
    return chosen


class MissingStatisticsError(ValueError):
    """The statistics lack a factor that a method needs."""


@dataclass
class LayerStats:
    """Sums for one layer: ``G = g_sum / num_sequences``, ``Y = y_sum / num_tokens``, and the
    layer's ``Z`` is ``Statistics.z_sums[input_group] / num_tokens``: ``input_group`` names the
    first layer that read this layer's input tensor, and is shared by every layer that reads it."""

    name: str
    in_features: int
    out_features: int
    g_sum: torch.Tensor | None  # [out, in]: Σ_n Σ_t g_t x_tᵀ (None: not collected)
    y_sum: torch.Tensor | None  # [out] (diag) or [out, out] (full, symmetric) (None: not collected)
    input_group: str  # the key of this layer's Z in Statistics.z_sums
    kind: str = "linear"

    def __repr__(self) -> str:
        y = "none" if self.y_sum is None else "diag" if self.y_sum.dim() == 1 else "full"
        return (f"LayerStats({self.name!r}, in={self.in_features}, out={self.out_features}, "
                f"g={'yes' if self.g_sum is not None else 'none'}, y={y}, input_group={self.input_group!r})")


@dataclass
class Statistics:
    """The statistics of one pass (docs/design.md §3), every method's input to the solve.

    ``layers``: per layer, its :class:`LayerStats` (sums of G and Y); ``z_sums``: the Z sums, one
    per input group (layers that read the same input tensor share one); ``num_tokens`` and
    ``num_sequences``: the counts the sums are divided by (:meth:`G`, :meth:`Y`, :meth:`Z` return the
    divided statistics); ``y_factor``: "diag" or "full"; ``meta``: the model and the pass
    (``model_class``, ``target_modules``, ``pass_seconds``, ...).  :meth:`save` / :meth:`load`: one
    safetensors file.
    """

    layers: dict[str, LayerStats]
    z_sums: dict[str, torch.Tensor]  # [in, in], symmetric (empty: Z not collected)
    num_tokens: int
    num_sequences: int
    y_factor: str | None  # None when Y was not collected
    meta: dict = field(default_factory=dict)
    # The sums of every second batch (the odd ones), for the split-half stability of the solve
    # (:mod:`loradafast.methods.stability`); the other half is these sums' complement.  None: not kept.
    half: "Statistics | None" = None

    def __repr__(self) -> str:  # no tensors: a model's statistics are gigabytes
        widths = sorted({(s.in_features, s.out_features) for s in self.layers.values()})
        shown = ", ".join(f"{i}→{o}" for i, o in widths[:4]) + (", ..." if len(widths) > 4 else "")
        return (f"Statistics({len(self.layers)} layers, {len(self.z_sums)} input groups, "
                f"factors={''.join(sorted(self.factors)) or 'none'}, {self.num_sequences} sequences, "
                f"{self.num_tokens} tokens, y_factor={self.y_factor!r}, {self.nbytes / 2**20:.1f} MiB"
                f"{'' if self.half is None else ' + a kept half'}, "
                f"shapes: {shown}, model={self.meta.get('model_class')!r})")

    @property
    def factors(self) -> frozenset:
        """Which of "G", "Y", "Z" these statistics hold for every layer."""
        layers = self.layers.values()
        held = {"G": all(s.g_sum is not None for s in layers), "Y": all(s.y_sum is not None for s in layers),
                "Z": all(s.input_group in self.z_sums for s in layers)}
        return frozenset(k for k, ok in held.items() if ok)

    def require(self, factors, what: str, hint: str = "") -> None:
        """Raise :class:`MissingStatisticsError` naming ``what`` unless every factor is held."""
        missing = sorted(set(factors) - self.factors)
        if missing:
            held = ", ".join(sorted(self.factors)) or "none"
            raise MissingStatisticsError(
                f"{what} needs the statistics {', '.join(sorted(factors))}, but these hold only {held} (the pass "
                f"collected factors={sorted(self.factors)}); run the pass again with {', '.join(missing)}: "
                f"loradafast.collect(model, loader) collects all three{hint}"
            )

    # The divided statistics, in the dtype the solve asks for.
    def G(self, name: str, dtype=torch.float64) -> torch.Tensor:
        self.require("G", "Statistics.G()")
        return _divided(self.layers[name].g_sum, dtype, self.num_sequences)

    def Z(self, name: str, dtype=torch.float64) -> torch.Tensor:
        self.require("Z", "Statistics.Z()")
        return _divided(self.z_sums[self.layers[name].input_group], dtype, self.num_tokens)

    def Y(self, name: str, dtype=torch.float64) -> torch.Tensor:
        self.require("Y", "Statistics.Y()")
        return self.layers[name].y_sum.to(dtype) / self.num_tokens

    def stack(self, factor: str, names: list[str], dtype=torch.float64, device=None) -> torch.Tensor:
        """``G``, ``Y`` or ``Z`` (``factor``) of the layers ``names``, stacked ``[len(names), ...]``
        in ``dtype``, the same values as the per-layer accessors: one copy into a preallocated
        tensor and one division for the stack, not a conversion per layer."""
        self.require(factor, f"Statistics.stack({factor!r})")
        layers = [self.layers[n] for n in names]
        sums = [s.g_sum if factor == "G" else s.y_sum if factor == "Y" else self.z_sums[s.input_group] for s in layers]
        device = sums[0].device if device is None else torch.device(device)
        out = torch.empty(len(sums), *sums[0].shape, dtype=dtype, device=device)
        if all(t.device == device for t in sums):
            torch.stack(sums, out=out)
        else:
            for row, t in zip(out, sums):
                row.copy_(t)
        return out.div_(self.num_sequences if factor == "G" else self.num_tokens)

    def device_of(self, name: str) -> torch.device:
        """Where layer ``name``'s statistics live."""
        s = self.layers[name]
        held = s.g_sum if s.g_sum is not None else s.y_sum if s.y_sum is not None else self.z_sums[s.input_group]
        return held.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the sums of the totals (a kept half holds as many more: ``half.nbytes``)."""
        tensors = [t for s in self.layers.values() for t in (s.g_sum, s.y_sum) if t is not None]
        return sum(t.numel() * t.element_size() for t in [*tensors, *self.z_sums.values()])

    def to(self, device) -> "Statistics":
        def move(t):
            return None if t is None else t.to(device)

        layers = {
            n: LayerStats(s.name, s.in_features, s.out_features, move(s.g_sum), move(s.y_sum), s.input_group, s.kind)
            for n, s in self.layers.items()
        }
        z = {k: v.to(device) for k, v in self.z_sums.items()}
        half = self.half.to(device) if self.half is not None else None
        return Statistics(layers, z, self.num_tokens, self.num_sequences, self.y_factor, dict(self.meta), half)

    def halves(self) -> "tuple[Statistics, Statistics] | None":
        """The statistics of the even batches and of the odd ones (each without a half of its own),
        for the layers held here; None where no half was kept or one of them is empty.  The even
        half is computed as the total less the odd one: one more copy of the sums, transiently."""
        half = self.half
        if half is None or not 0 < half.num_sequences < self.num_sequences:
            return None
        odd = Statistics({n: half.layers[n] for n in self.layers}, {k: half.z_sums[k] for k in self.z_sums},
                         half.num_tokens, half.num_sequences, self.y_factor, dict(self.meta))
        even = Statistics(
            {n: LayerStats(s.name, s.in_features, s.out_features, _less(s.g_sum, odd.layers[n].g_sum),
                           _less(s.y_sum, odd.layers[n].y_sum), s.input_group, s.kind)
             for n, s in self.layers.items()},
            {k: z - odd.z_sums[k] for k, z in self.z_sums.items()},
            self.num_tokens - half.num_tokens, self.num_sequences - half.num_sequences, self.y_factor,
            dict(self.meta))
        return even, odd

    def save(self, path) -> None:
        """One safetensors file; counts, layer shapes and provenance in its metadata."""
        from safetensors.torch import save_file

        tensors = self._tensors("")
        if self.half is not None:
            tensors.update(self.half._tensors(HALF_PREFIX))
        header = {
            "format": "loradafast.statistics",
            "format_version": FORMAT_VERSION,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "y_factor": self.y_factor,
            "factors": sorted(self.factors),
            "layers": {n: [s.in_features, s.out_features, s.input_group, s.kind] for n, s in self.layers.items()},
            "meta": self.meta,
            "half": None if self.half is None else [self.half.num_tokens, self.half.num_sequences],
        }
        save_file(tensors, str(path), metadata={"loradafast": json.dumps(header)})

    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, s in self.layers.items():
            for factor, t in (("g", s.g_sum), ("y", s.y_sum)):
                if t is not None:
                    tensors[f"{prefix}{factor}/{name}"] = t.contiguous().cpu()
        for key, z in self.z_sums.items():
            tensors[f"{prefix}z/{key}"] = z.contiguous().cpu()
        return tensors

    @classmethod
    def load(cls, path) -> "Statistics":
        """The statistics saved in ``path``; every tensor's shape and dtype is checked against the
        header, so a damaged or hand-edited file fails here, naming itself, not in the solve."""
        from safetensors import SafetensorError

        path = Path(path)
        try:
            return cls._load(path)
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path} is not a readable loradafast statistics file ({type(e).__name__}: {e}); it may "
                             "be truncated or damaged: delete it and collect the statistics again") from e

    @classmethod
    def _load(cls, path: Path) -> "Statistics":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("loradafast")
            if raw is None:
                raise ValueError(f"{path} is not a loradafast statistics file (no 'loradafast' metadata)")
            header = json.loads(raw)
            if header.get("format_version") not in READABLE_VERSIONS:
                raise ValueError(
                    f"{path} holds statistics in format version {header.get('format_version')}, this "
                    f"loradafast reads versions {READABLE_VERSIONS}; collect the statistics again"
                )
            factors = set(header.get("factors", FACTORS))
            stats = cls(*_read_sums(f, path, header, factors, ""), header["y_factor"], header.get("meta", {}))
            if header.get("half") is not None:
                stats.half = cls(*_read_sums(f, path, header, factors, HALF_PREFIX, header["half"]), header["y_factor"])
        return stats


def _read_sums(f, path: Path, header: dict, factors: set, prefix: str, counts=None) -> tuple:
    """(layers, z_sums, num_tokens, num_sequences) of one set of sums in an open statistics file."""
    layers, z_sums = {}, {}

    def tensor(factor, key, shape):
        if factor not in factors:
            return None
        t = f.get_tensor(prefix + key)
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise ValueError(f"{path}: tensor {prefix + key!r} is {t.dtype} {tuple(t.shape)}, its header says float32 "
                             f"{shape}; the file is damaged or was edited: delete it and collect again")
        return t

    y_shape = {"diag": lambda out: (out,), "full": lambda out: (out, out)}.get(header["y_factor"])
    if "Y" in factors and y_shape is None:
        raise ValueError(f"{path}: y_factor {header['y_factor']!r} in the header is neither 'diag' nor 'full'")
    # Each layer's entry is [in, out, input group, kind] (the input group was called z_key).
    for name, (fin, fout, group, kind) in header["layers"].items():
        layers[name] = LayerStats(name, fin, fout, tensor("G", f"g/{name}", (fout, fin)),
                                  tensor("Y", f"y/{name}", y_shape(fout) if y_shape else None), group, kind)
        if "Z" in factors and group not in z_sums:
            z_sums[group] = tensor("Z", f"z/{group}", (fin, fin))
        elif "Z" in factors and z_sums[group].shape[0] != fin:
            raise ValueError(f"{path}: layer {name!r} is {fin} wide but reads input group {group!r}, which is "
                             f"{z_sums[group].shape[0]} wide; the file is damaged: delete it and collect again")
    counts = (header["num_tokens"], header["num_sequences"]) if counts is None else tuple(counts)
    if not (len(counts) == 2 and all(isinstance(c, int) and c >= 0 for c in counts)):
        raise ValueError(f"{path}: the header's counts {counts} are not token and sequence counts")
    return layers, z_sums, *counts


def _less(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    return None if total is None else total - part


def _divided(total: torch.Tensor, dtype: torch.dtype, count: int) -> torch.Tensor:
    """``total / count`` in ``dtype`` with one new tensor, not two: at 7B widths a Z is 1 GB in
    float64, and each pass over a fresh one costs a second of page faults on the CPU."""
    out = total.to(dtype)
    return out / count if out is total else out.div_(count)
