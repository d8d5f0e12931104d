"""Per-layer statistics of one collect pass (docs/design.md §3), stored as fp32 sums plus counts."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


FORMAT_VERSION = 1


@dataclass
class LayerStats:
    """Sums for one layer: ``G = g_sum / num_sequences``, ``Y = y_sum / num_tokens``, and the
    layer's ``Z`` is ``Statistics.z_sums[input_group] / num_tokens``: ``input_group`` names the
    first layer that read this layer's input tensor, and is shared by every layer that reads it."""

    name: str
    in_features: int
    out_features: int
    g_sum: torch.Tensor  # [out, in]: Σ_n Σ_t g_t x_tᵀ
    y_sum: torch.Tensor  # [out] (diag) or [out, out] (full, symmetric)
    input_group: str  # the key of this layer's Z in Statistics.z_sums
    kind: str = "linear"

    def __repr__(self) -> str:
        return (f"LayerStats({self.name!r}, in={self.in_features}, out={self.out_features}, "
                f"y={'diag' if self.y_sum.dim() == 1 else 'full'}, input_group={self.input_group!r})")


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
    z_sums: dict[str, torch.Tensor]  # [in, in], symmetric
    num_tokens: int
    num_sequences: int
    y_factor: str
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # no tensors: a model's statistics are gigabytes
        widths = sorted({(s.in_features, s.out_features) for s in self.layers.values()})
        shown = ", ".join(f"{i}→{o}" for i, o in widths[:4]) + (", ..." if len(widths) > 4 else "")
        return (f"Statistics({len(self.layers)} layers, {len(self.z_sums)} input groups, "
                f"{self.num_sequences} sequences, {self.num_tokens} tokens, y_factor={self.y_factor!r}, "
                f"shapes: {shown}, model={self.meta.get('model_class')!r})")

    # The divided statistics, in the dtype the solve asks for.
    def G(self, name: str, dtype=torch.float64) -> torch.Tensor:
        return self.layers[name].g_sum.to(dtype) / self.num_sequences

    def Z(self, name: str, dtype=torch.float64) -> torch.Tensor:
        return self.z_sums[self.layers[name].input_group].to(dtype) / self.num_tokens

    def Y(self, name: str, dtype=torch.float64) -> torch.Tensor:
        return self.layers[name].y_sum.to(dtype) / self.num_tokens

    def to(self, device) -> "Statistics":
        layers = {
            n: LayerStats(s.name, s.in_features, s.out_features, s.g_sum.to(device), s.y_sum.to(device),
                          s.input_group, s.kind)
            for n, s in self.layers.items()
        }
        z = {k: v.to(device) for k, v in self.z_sums.items()}
        return Statistics(layers, z, self.num_tokens, self.num_sequences, self.y_factor, dict(self.meta))

    def save(self, path) -> None:
        """One safetensors file; counts, layer shapes and provenance in its metadata."""
        from safetensors.torch import save_file

        tensors = {}
        for name, s in self.layers.items():
            tensors[f"g/{name}"] = s.g_sum.contiguous().cpu()
            tensors[f"y/{name}"] = s.y_sum.contiguous().cpu()
        for key, z in self.z_sums.items():
            tensors[f"z/{key}"] = z.contiguous().cpu()
        header = {
            "format": "loradafast.statistics",
            "format_version": FORMAT_VERSION,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "y_factor": self.y_factor,
            "layers": {n: [s.in_features, s.out_features, s.input_group, s.kind] for n, s in self.layers.items()},
            "meta": self.meta,
        }
        save_file(tensors, str(path), metadata={"loradafast": json.dumps(header)})

    @classmethod
    def load(cls, path) -> "Statistics":
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("loradafast")
            if raw is None:
                raise ValueError(f"{path} is not a loradafast statistics file (no 'loradafast' metadata)")
            header = json.loads(raw)
            if header.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path} holds statistics in format version {header.get('format_version')}, this "
                    f"loradafast reads version {FORMAT_VERSION}; collect the statistics again"
                )
            layers = {}
            z_sums = {}
            # Each layer's entry is [in, out, input group, kind] (the input group was called z_key).
            for name, (fin, fout, group, kind) in header["layers"].items():
                layers[name] = LayerStats(name, fin, fout, f.get_tensor(f"g/{name}"), f.get_tensor(f"y/{name}"),
                                          group, kind)
                if group not in z_sums:
                    z_sums[group] = f.get_tensor(f"z/{group}")
        return cls(layers, z_sums, header["num_tokens"], header["num_sequences"], header["y_factor"],
                   header.get("meta", {}))
