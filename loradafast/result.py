"""What a solve hands on: per-layer factors, their PEFT config, and how to write them out.

Nothing here changes a model until :meth:`InitResult.apply_to` is called, and that method checks
every layer before it writes the first one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .targets import PEFT_PREFIX, Target, find_targets

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LayerInit:
    name: str
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    kind: str = "linear"  # "linear" or "conv1d" (the base weight's storage)
    # For methods that move the base weight (PiSSA, LoRA-GA, ...): W_new − W_old as [out, in].
    weight_update: torch.Tensor | None = None
    diagnostics: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def __repr__(self) -> str:  # keep tensors out of the repr
        keys = ", ".join(sorted(self.diagnostics))
        return (f"LayerInit({self.name!r}, rank={self.rank}, in={self.lora_A.shape[1]}, "
                f"out={self.lora_B.shape[0]}, diagnostics: {keys})")


@dataclass
class InitResult:
    layers: dict[str, LayerInit]
    method: str
    rank: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    # ---- PEFT views -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-format keys, as ``PeftModel.save_pretrained`` writes them (no adapter name)."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        return out

    @property
    def lora_config(self):
        from peft import LoraConfig

        ranks = {name: layer.rank for name, layer in self.layers.items()}
        # Per-layer ranks that differ from the default go to rank_pattern, keyed by full path
        # (PEFT matches rank_pattern keys as regexes anchored at a path boundary).
        rank_pattern = {re.escape(name): r for name, r in ranks.items() if r != self.rank}
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            target_modules=self.target_modules if self.target_modules is not None else sorted(self.layers),
            rank_pattern=rank_pattern,
            fan_in_fan_out=any(layer.kind == "conv1d" for layer in self.layers.values()),
            base_model_name_or_path=self.base_model_name_or_path,
            task_type=self.task_type,
            lora_dropout=0.0,
        )

    def save(self, directory) -> Path:
        """A PEFT adapter directory that vanilla ``PeftModel.from_pretrained`` loads."""
        from safetensors.torch import save_file

        if any(layer.weight_update is not None for layer in self.layers.values()):
            raise NotImplementedError(
                f"method {self.method!r} moves the base weights; saving it as a plain adapter needs the "
                "base-weight conversion, which this version does not write yet"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lora_config.save_pretrained(str(directory))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        summary = {
            "method": self.method,
            "rank": self.rank,
            "options": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                        for k, v in self.options.items()},
            "timings": self.timings,
        }
        (directory / "loradafast_init.json").write_text(json.dumps(summary, indent=2))
        return directory

    # ---- writing into a PEFT model ----------------------------------------------------------
    def apply_to(self, peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
        """Fill the LoRA layers of ``peft_model`` in place.

        Every layer is checked (presence, rank, shapes) before the first one is written, so a
        mismatch leaves the model untouched.
        """
        targets = {t.name: t for t in find_targets(peft_model, adapter_name=adapter_name)}
        missing = sorted(set(self.layers) - set(targets))
        if missing:
            raise ValueError(
                f"the PEFT model has no LoRA layer for {len(missing)} initialised layer(s), e.g. {missing[:3]}; "
                "create it with result.lora_config"
            )
        plan = []
        for name, layer in self.layers.items():
            target: Target = targets[name]
            adapter = adapter_name or _active(target.lora_layer)
            a = target.lora_layer.lora_A[adapter].weight
            b = target.lora_layer.lora_B[adapter].weight
            if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
                raise ValueError(
                    f"layer {name!r}: the PEFT model has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, the "
                    f"initialisation has {tuple(layer.lora_A.shape)} / {tuple(layer.lora_B.shape)}; use the same rank"
                )
            plan.append((layer, target, a, b))
        with torch.no_grad():
            for layer, target, a, b in plan:
                a.copy_(layer.lora_A.to(device=a.device, dtype=a.dtype))
                b.copy_(layer.lora_B.to(device=b.device, dtype=b.dtype))
                if layer.weight_update is not None:
                    w = target.weight_out_in()
                    w.add_(layer.weight_update.to(device=w.device, dtype=w.dtype))
        return peft_model

    def summary(self) -> str:
        """One line per layer: shapes, the extreme kept eigenvalue, residual, damping."""
        rows = [f"{'layer':<48} {'in':>6} {'out':>6} {'r':>3}  {'λ_min(Ω)':>11} {'λ_r(Ω)':>11} "
                f"{'residual':>9} {'‖Δ‖₂':>10}"]
        for name, layer in self.layers.items():
            d = layer.diagnostics
            ev = d.get("eigenvalues")
            lo = f"{float(ev[0]):11.3e}" if ev is not None else f"{'-':>11}"
            hi = f"{float(ev[-1]):11.3e}" if ev is not None else f"{'-':>11}"
            res = f"{d['residual']:9.1e}" if "residual" in d else f"{'-':>9}"
            sig = f"{d['sigma']:10.3e}" if "sigma" in d else f"{'-':>10}"
            rows.append(f"{name:<48} {layer.lora_A.shape[1]:>6} {layer.lora_B.shape[0]:>6} {layer.rank:>3}  "
                        f"{lo} {hi} {res} {sig}")
        return "\n".join(rows)


def _active(layer) -> str:
    from .targets import _active_adapter

    return _active_adapter(layer)
