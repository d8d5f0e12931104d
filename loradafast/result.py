"""What a solve hands on: per-layer factors, their PEFT config, and how to write them out.

Nothing here changes a model until :meth:`InitResult.apply_to` is called, and that method checks
every layer before it writes the first one.

Methods that move the base weight (PiSSA, MiLoRA, LoRA-GA, the Fisher subspace) pair the adapter
with a *residual* base ``W − s·B₀A₀`` (``s`` the LoRA scaling), so that the model's output is
unchanged at initialisation.  Such a result is saved in one of two forms (PEFT's own conventions,
``LoraModel.subtract_mutated_init`` and ``PeftModel.save_pretrained(...,
path_initial_model_for_weight_conversion=...)``):

* ``save(dir, convert_to_lora=False)``: the rank-r adapter for the residual base.  The residual
  is not stored (it is determined by the adapter itself): :func:`apply_base_update` turns the
  original base model into it, after which ``PeftModel.from_pretrained(model, dir)`` gives the
  initialised model.  This directory is also what PEFT's conversion of a *trained* adapter
  expects as the initial adapter (``path_initial_model_for_weight_conversion=dir``).
* ``save(dir, convert_to_lora=True)``: a plain rank-2r adapter for the *unmodified* base,
  ``lora_A = [A₀; A₀]``, ``lora_B = [B₀, −B₀]``, ``r → 2r`` and ``lora_alpha → 2·lora_alpha``
  (``√2·lora_alpha`` with rsLoRA) so the scaling is unchanged; its ``ΔW`` is zero, as it must be
  before training.
"""
from __future__ import annotations

import copy
import json
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .targets import PEFT_PREFIX, Target, _active_adapter, _kind, base_model_of, find_targets

ADAPTER_WEIGHTS = "adapter_model.safetensors"
INIT_SUMMARY = "loradafast_init.json"
# Set on a base layer whose weight a loradafast initialisation has moved; a second move would
# subtract twice and silently change the model's output.
_MOVED_FLAG = "_loradafast_base_moved"


class _FieldMapping(Mapping):
    """Read-only mapping view of a dataclass's fields that are set (not None), so that
    ``diagnostics["residual"]``, ``diagnostics.get(...)`` and ``"residual" in diagnostics`` keep
    working beside the attributes."""

    def _set(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __getitem__(self, key: str):
        value = getattr(self, key, None) if isinstance(key, str) and key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self):
        return iter(self._set())

    def __len__(self) -> int:
        return len(self._set())

    @classmethod
    def _names(cls) -> set:
        return {f.name for f in fields(cls)}


@dataclass
class LayerDiagnostics(_FieldMapping):
    """What a solve reports about one layer; the method families add their own fields."""

    num_tokens: int | None = None  # of the statistics (data-aware methods)
    num_sequences: int | None = None


@dataclass
class SingularDiagnostics(LayerDiagnostics):
    """PiSSA, MiLoRA: the kept singular values of the weight."""

    singular_values: torch.Tensor | None = None


@dataclass
class GradientDiagnostics(LayerDiagnostics):
    """LoRA-GA, LoRA-One: the gradient's singular values they used."""

    gradient_singular_values: torch.Tensor | None = None


@dataclass
class FisherSubspaceDiagnostics(SingularDiagnostics):
    fisher_energy: torch.Tensor | None = None  # of the kept triplets, in decreasing order
    energy_fraction: float | None = None
    singular_indices: torch.Tensor | None = None  # positions in the σ-descending order


@dataclass
class LoraDADiagnostics(LayerDiagnostics):
    """LoRA-DA (docs/design.md §4, §7): the eigensolve, the damping and the scale of Δ."""

    eigenvalues: torch.Tensor | None = None  # the r smallest of Ω, ascending
    residual: float | None = None  # ‖ΩX − XΛ‖_F / ‖Ω‖₂
    residual_floor: float | None = None  # measured rounding of the implicit Ω products
    omega_norm: float | None = None
    eigensolver: str | None = None  # "lobpcg" or "dense"
    eigensolver_iterations: int | None = None
    eigensolver_converged: bool | None = None
    eigensolver_fallback: bool | None = None
    sigma_iterations: int | None = None
    preconditioner_factorisations: int | None = None
    damping_z: float | None = None
    damping_y: float | None = None
    damping_raised: bool | None = None
    z_condition_estimate: float | None = None
    y_condition_estimate: float | None = None
    cholesky_dtype: str | None = None
    sigma: float | None = None  # ‖Δ‖₂
    variance_coef: float | None = None
    input_group: str | None = None  # the layer whose input this one shares (Z's key)
    group_times_s: dict | None = None  # stage times of the whole input group


@dataclass
class LayerInit:
    name: str
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    kind: str = "linear"  # "linear" or "conv1d" (the base weight's storage)
    # For methods that move the base weight (PiSSA, LoRA-GA, ...): the base weight becomes
    # W − subtract_scaling·B·A, subtract_scaling being the layer's LoRA scaling s.  The update
    # is kept implicit: storing it would cost as much memory as the targeted weights.
    subtract_scaling: float | None = None
    diagnostics: LayerDiagnostics = field(default_factory=LayerDiagnostics)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def weight_update(self) -> torch.Tensor | None:
        """``W_new − W_old`` as ``[out, in]`` float32 (None when the base weight is unchanged)."""
        if self.subtract_scaling is None:
            return None
        return -self.subtract_scaling * (self.lora_B.float() @ self.lora_A.float())

    def __repr__(self) -> str:  # keep tensors out of the repr
        keys = ", ".join(sorted(self.diagnostics))
        return (f"LayerInit({self.name!r}, rank={self.rank}, in={self.lora_A.shape[1]}, "
                f"out={self.lora_B.shape[0]}, moves_base={self.subtract_scaling is not None}, diagnostics: {keys})")


@dataclass
class InitResult:
    layers: dict[str, LayerInit]
    method: str
    rank: int
    lora_alpha: float
    use_rslora: bool = False
    alphas: dict[str, float] = field(default_factory=dict)  # per-layer lora_alpha ≠ lora_alpha
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    # LoRA-FA: lora_A stays at its initialisation, only lora_B trains.  apply_to (hence
    # get_peft_model) sets requires_grad=False on lora_A; a saved adapter cannot carry it.
    freeze_a: bool = False
    # The LoraConfig of the PeftModel this result was made for (initialize(peft_model)): saved as
    # it is, with only what the method changes, so that no option of the user's is lost.
    peft_config: object | None = None
    # That PeftModel's other adapter tensors after the initialisation (DoRA magnitudes,
    # modules_to_save copies, LoRA biases), in PEFT's keys: saved with the factors.
    extra_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # The validated options object the solve ran with (LoraDAConfig, PissaConfig, ...).
    config: object | None = None

    @property
    def moves_base(self) -> bool:
        """True when the initialised model needs the residual base ``W − s·B₀A₀``."""
        return any(layer.subtract_scaling is not None for layer in self.layers.values())

    # ---- PEFT views -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-format keys, as ``PeftModel.save_pretrained`` writes them (no adapter name)."""
        out = dict(self.extra_state)
        for name, layer in self.layers.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
        return out

    def converted_state_dict(self) -> dict[str, torch.Tensor]:
        """The rank-2r adapter for the unmodified base (PEFT's ``subtract_mutated_init``)."""
        out = dict(self.extra_state)
        for name, layer in self.layers.items():
            a, b = layer.lora_A, layer.lora_B
            if layer.subtract_scaling is not None:
                a, b = torch.cat([a, a], dim=0), torch.cat([b, -b], dim=1)
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        return out

    @property
    def lora_config(self):
        """The ``LoraConfig`` of :meth:`state_dict` (for the residual base if :attr:`moves_base`)."""
        return self._lora_config(converted=False)

    def _lora_config(self, converted: bool):
        from peft import LoraConfig

        if self.peft_config is not None:
            return self._kept_peft_config(converted)
        factor = 2 if converted and self.moves_base else 1
        ranks = {name: layer.rank * factor for name, layer in self.layers.items()}
        rank = self.rank * factor
        alpha_factor = (math.sqrt(2) if self.use_rslora else 2) if factor == 2 else 1
        # Per-layer ranks and alphas that differ from the defaults go to rank_pattern and
        # alpha_pattern, keyed by full path (PEFT matches their keys as regexes anchored at a
        # path boundary).
        rank_pattern = {re.escape(name): r for name, r in ranks.items() if r != rank}
        alpha_pattern = {re.escape(name): a * alpha_factor for name, a in self.alphas.items()}
        return LoraConfig(
            r=rank,
            # Keep the scaling alpha/r (alpha/√r with rsLoRA) as PEFT's conversion does.
            lora_alpha=self.lora_alpha * alpha_factor,
            use_rslora=self.use_rslora,
            target_modules=self.target_modules if self.target_modules is not None else sorted(self.layers),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            fan_in_fan_out=any(layer.kind == "conv1d" for layer in self.layers.values()),
            base_model_name_or_path=self.base_model_name_or_path,
            task_type=self.task_type,
            lora_dropout=0.0,
        )

    def _kept_peft_config(self, converted: bool):
        """The PeftModel's own LoraConfig, changed only where the saved adapter requires it."""
        config = copy.deepcopy(self.peft_config)
        # The factors are in the file; a PEFT init such as "pissa" would run again on loading and
        # move the base weight a second time.
        config.init_lora_weights = True
        if config.base_model_name_or_path is None:  # as PeftModel.save_pretrained fills it
            config.base_model_name_or_path = self.base_model_name_or_path
        if converted and self.moves_base:
            # r → 2r with the scaling kept, per layer as well (PEFT's conversion, with √2 for
            # rsLoRA's alpha/√r applied to alpha_pattern too).
            alpha_factor = math.sqrt(2) if config.use_rslora else 2
            config.r *= 2
            config.lora_alpha *= alpha_factor
            config.rank_pattern = {key: 2 * r for key, r in (config.rank_pattern or {}).items()}
            config.alpha_pattern = {key: a * alpha_factor for key, a in (config.alpha_pattern or {}).items()}
        return config

    def save(self, directory, *, convert_to_lora: bool | None = None) -> Path:
        """A PEFT adapter directory that vanilla ``PeftModel.from_pretrained`` loads.

        For a method that keeps the base weight (``lora``, ``lora-one``, ``lora-da``) the adapter
        is a plain LoRA adapter and ``convert_to_lora`` does not matter.  For one that moves it
        (``pissa``, ``milora``, ``lora-ga``, ``fisher-subspace``) choose explicitly:

        * ``convert_to_lora=False``: the rank-r adapter for the residual base ``W − s·B₀A₀``;
          build that base from the original with :func:`apply_base_update` (same directory).
        * ``convert_to_lora=True``: a rank-2r adapter ``[A₀; A₀]``, ``[B₀, −B₀]`` for the
          unmodified base, with ``r`` and ``lora_alpha`` adjusted as PEFT's own conversion does.

        ``loradafast_init.json`` records the method, options, timings, ``freeze_a`` and which
        base the adapter is for (``"base_weight"``: "unchanged", "residual" or "converted").
        LoRA-FA's frozen A is not part of the PEFT format: after loading with
        ``is_trainable=True``, call :func:`freeze_lora_a`.
        """
        from safetensors.torch import save_file

        if self.moves_base and convert_to_lora is None:
            raise ValueError(
                f"method {self.method!r} moves the base weights (W ← W − s·B₀A₀), so the adapter alone does not "
                "reproduce the initialised model; choose save(dir, convert_to_lora=True) for a plain rank-2r "
                "adapter on the unmodified base model, or save(dir, convert_to_lora=False) for the rank-r "
                "adapter on the residual base (rebuild it with loradafast.apply_base_update(model, dir))"
            )
        converted = bool(convert_to_lora) and self.moves_base
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._lora_config(converted).save_pretrained(str(directory))
        state = self.converted_state_dict() if converted else self.state_dict()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        summary = {
            "method": self.method,
            "rank": self.rank,
            "base_weight": "converted" if converted else ("residual" if self.moves_base else "unchanged"),
            "freeze_a": self.freeze_a,
            "options": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                        for k, v in self.options.items()},
            "timings": self.timings,
        }
        (directory / INIT_SUMMARY).write_text(json.dumps(summary, indent=2))
        return directory

    # ---- writing into a PEFT model ----------------------------------------------------------
    def apply_to(self, peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
        """Fill the LoRA layers of ``peft_model`` in place.

        Every layer is checked (presence, rank, shapes) before the first one is written, so a
        mismatch leaves the model untouched.  For a method that moves the base weight, the base
        layer's weight becomes ``W − s·B·A`` (computed in float32 from the factors as stored in
        the adapter's dtype, as PEFT's PiSSA/LoRA-GA init does), once per model; a warning says
        so when that weight is tied to another (an output embedding tied to the input one).
        A DoRA layer's magnitude is recomputed from the new factors, as PEFT's DoRA init does.
        With ``freeze_a`` the ``lora_A`` weights stop requiring grad (PEFT's ``set_adapter`` and
        ``add_adapter`` make them trainable again; call :func:`freeze_lora_a` after those).
        """
        plan = self._plan(peft_model, adapter_name)
        _warn_if_tied(peft_model, [(name, target.module.weight) for name, target, adapter in plan
                                   if self.layers[name].subtract_scaling is not None], f"method {self.method!r}")
        with torch.no_grad():
            for name, target, adapter in plan:
                layer = self.layers[name]
                a = target.lora_layer.lora_A[adapter].weight
                b = target.lora_layer.lora_B[adapter].weight
                a.copy_(layer.lora_A.to(device=a.device, dtype=a.dtype))
                b.copy_(layer.lora_B.to(device=b.device, dtype=b.dtype))
                if layer.subtract_scaling is not None:
                    _subtract_(target, a, b, layer.subtract_scaling)
                if adapter in getattr(target.lora_layer, "lora_magnitude_vector", {}):
                    _refresh_dora_magnitude(target.lora_layer, adapter)
                if self.freeze_a:
                    a.requires_grad_(False)
        return peft_model

    def _plan(self, peft_model: nn.Module, adapter_name: str | None) -> list[tuple[str, Target, str]]:
        """(layer, target, adapter) for every layer, after checking that each can be written."""
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
            adapter = adapter_name or _active_adapter(target.lora_layer)
            a = target.lora_layer.lora_A[adapter].weight
            b = target.lora_layer.lora_B[adapter].weight
            if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
                raise ValueError(
                    f"layer {name!r}: the PEFT model has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, the "
                    f"initialisation has {tuple(layer.lora_A.shape)} / {tuple(layer.lora_B.shape)}; use the same rank"
                )
            if layer.subtract_scaling is not None:
                _check_movable(name, target, adapter, layer.subtract_scaling, self.method)
            plan.append((name, target, adapter))
        return plan

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


def _subtract_(target: Target, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """``W ← W − s·B·A`` in float32, rounded once to W's dtype (PEFT's ``pissa_init`` order)."""
    w = target.weight_out_in()  # a transposed view for Conv1D: the write lands in its storage
    update = scaling * (b.to(device=w.device, dtype=torch.float32) @ a.to(device=w.device, dtype=torch.float32))
    w.copy_((w.float() - update).to(w.dtype))
    setattr(target.module, _MOVED_FLAG, True)


def _check_movable(name: str, target: Target, adapter: str, subtract_scaling: float, method: str) -> None:
    scaling = target.lora_layer.scaling[adapter]
    if not math.isclose(scaling, subtract_scaling, rel_tol=1e-6):
        raise ValueError(
            f"layer {name!r}: the PEFT model's LoRA scaling is {scaling}, the initialisation was solved "
            f"for {subtract_scaling}; use the same lora_alpha, rank and use_rslora"
        )
    if adapter in getattr(target.lora_layer, "lora_magnitude_vector", {}):
        raise ValueError(dora_refusal(method))
    if getattr(target.module, _MOVED_FLAG, False):
        raise ValueError(
            f"the base weight of layer {name!r} was already moved by a loradafast initialisation; moving "
            "it again would change the model's output. Start from the original model"
        )


def dora_refusal(method: str) -> str:
    return (
        f"use_dora=True cannot be combined with method {method!r}, which moves the base weight: DoRA's magnitude "
        "is the norm of the base weight plus the adapter, and loradafast does not carry it through the residual "
        "base and the rank-2r conversion. Use DoRA with a method that keeps the base weight (lora-da, lora-one, "
        "lora), or set use_dora=False"
    )


def _refresh_dora_magnitude(lora_layer: nn.Module, adapter: str) -> None:
    """DoRA's magnitude ``‖W + s·B·A‖`` (per output row), computed by PEFT's own code from the
    factors just written.  PEFT computed it when the layer was created, from the factors of its
    own init; written into the existing parameter so that references to it stay valid."""
    from peft.tuners.lora.dora import DoraLinearLayer

    dora = lora_layer.lora_magnitude_vector[adapter]
    fresh = DoraLinearLayer(fan_in_fan_out=getattr(dora, "fan_in_fan_out", False))
    fresh.update_layer(base_layer=lora_layer.get_base_layer(), lora_A=lora_layer.lora_A[adapter].weight,
                       lora_B=lora_layer.lora_B[adapter].weight, scaling=lora_layer.scaling[adapter])
    dora.weight.copy_(fresh.weight.to(device=dora.weight.device, dtype=dora.weight.dtype))
    if hasattr(dora, "_cache_clear"):  # a weight norm cached in eval mode is stale now
        dora._cache_clear()


def _warn_if_tied(model: nn.Module, moved: list[tuple[str, torch.Tensor]], who: str) -> None:
    """One warning for every moved weight that other modules share (tied embeddings)."""
    owners = defaultdict(list)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)].append(pname.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."))
    tied = []
    for name, weight in moved:
        others = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"]
        if others:
            tied.append(f"{name!r} is tied to {', '.join(repr(o) for o in others)}")
    if tied:
        warnings.warn(
            f"loradafast: {who} moves the base weight of layers whose weight is tied to another: "
            f"{'; '.join(tied)}. The tied weight moves too, so the model's logits at initialisation change "
            "(PEFT's own PiSSA does the same, silently). To keep them, give each layer its own copy of the weight "
            "before initialising (layer.weight = torch.nn.Parameter(layer.weight.detach().clone()), and "
            "model.config.tie_word_embeddings = False so that transformers does not tie it again), or exclude "
            "these layers from target_modules",
            UserWarning, stacklevel=3,
        )


def peft_extra_state(peft_model: nn.Module, adapter_name: str, layers) -> dict[str, torch.Tensor]:
    """Copies of the adapter's tensors other than the factors of ``layers`` (DoRA magnitudes,
    modules_to_save copies, LoRA biases, trainable tokens), keyed as ``save_pretrained`` writes
    them; empty for a model that is not a PeftModel."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    if not isinstance(peft_model, PeftModel):
        return {}
    factors = {f"{PEFT_PREFIX}{name}.lora_{ab}.weight" for name in layers for ab in "AB"}
    # Base weights stay out: for a targeted embedding PEFT would add the embedding matrices (meant
    # for resized vocabularies), which after a base-moving method hold the residual base.
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in state.items() if k not in factors}


def apply_base_update(model: nn.Module, directory) -> nn.Module:
    """Turn the original base model into the residual base of an adapter saved with
    ``save(dir, convert_to_lora=False)``: ``W ← W − s·B·A`` for every layer of the adapter.

    Then ``PeftModel.from_pretrained(model, dir)`` is the initialised model.  ``model`` is the
    plain (transformers) model; every layer is checked before the first one is written.
    """
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    directory = Path(directory)
    summary_path = directory / INIT_SUMMARY
    base_weight = json.loads(summary_path.read_text()).get("base_weight") if summary_path.exists() else None
    if base_weight != "residual":
        raise ValueError(
            f"{directory} does not hold an adapter for a residual base (its {INIT_SUMMARY} says base_weight="
            f"{base_weight!r}); load it with PeftModel.from_pretrained on the unmodified model"
        )
    config = LoraConfig.from_pretrained(str(directory))
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    base = base_model_of(model)
    plan = []
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b = tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r} of the adapter in {directory}") from None
        kind = _kind(module)
        target = Target(name, module, kind) if kind is not None else None
        if target is None or (target.out_features, target.in_features) != (b.shape[0], a.shape[1]):
            raise ValueError(f"layer {name!r} of the model does not match the adapter's factors {tuple(b.shape)}·"
                             f"{tuple(a.shape)}")
        if getattr(module, _MOVED_FLAG, False):
            raise ValueError(f"the base weight of layer {name!r} was already moved; start from the original model")
        r = a.shape[0]
        alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), name), config.lora_alpha) \
            if config.alpha_pattern else config.lora_alpha
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        plan.append((target, a, b, scaling))
    _warn_if_tied(base, [(target.name, target.module.weight) for target, *_ in plan], f"the adapter in {directory}")
    with torch.no_grad():
        for target, a, b, scaling in plan:
            _subtract_(target, a, b, scaling)
    return model


def freeze_lora_a(peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """LoRA-FA: stop ``lora_A`` of ``adapter_name`` (the active adapter) from training.

    A saved adapter does not record this; call it after ``PeftModel.from_pretrained(...,
    is_trainable=True)``, and again after ``set_adapter``/``add_adapter``, which make it trainable.
    """
    targets = find_targets(peft_model, adapter_name=adapter_name)
    if not targets:
        raise ValueError("the model has no LoRA layer to freeze")
    for t in targets:
        t.lora_layer.lora_A[adapter_name or _active_adapter(t.lora_layer)].weight.requires_grad_(False)
    return peft_model

