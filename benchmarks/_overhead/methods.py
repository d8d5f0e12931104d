"""The timed methods, one function each, in ``PROVIDERS``.  Each takes ``(model, batches, spec)``
and returns ``{"pass_s", "solve_s", "apply_s", "extra"}`` (None where the method exposes no such
split); the caller measures the wall time around it."""
from __future__ import annotations

import time
from collections import Counter
from functools import partial

import torch
from _common import sync

from .config import LORADAFAST_METHODS
from .models import embedding_leaf_hook, lora_config, sequence_loss_sum
from .official import run_official


def _forward_backward(model, batches):
    """One forward+backward per batch, the embeddings' output a leaf (the input gradients)."""
    handle = model.get_input_embeddings().register_forward_hook(embedding_leaf_hook)
    try:
        with torch.enable_grad():
            for b in batches:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                sequence_loss_sum(out.logits, b["input_ids"]).backward()
                del out
    finally:
        handle.remove()


def run_floor(model, batches, spec):
    for p in model.parameters():
        p.requires_grad_(False)
    _forward_backward(model, batches)
    sync(spec["device"])
    return {"pass_s": None, "solve_s": None, "apply_s": None}


def run_training_floor(model, batches, spec):
    """The training-step floor: :func:`run_floor` plus the weight gradients of the target layers
    (their weights require grad, everything else frozen), accumulated over the batches as G is."""
    from .config import TARGETS

    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    for w in weights:
        w.requires_grad_(True)
    try:
        _forward_backward(model, batches)
        sync(spec["device"])
    finally:
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
    return {"pass_s": None, "solve_s": None, "apply_s": None,
            "extra": {"weight_gradients": len(weights)}}


def run_loradafast(model, batches, spec, name):
    import loradafast

    method, options = LORADAFAST_METHODS[name]
    started = time.perf_counter()
    peft_model = loradafast.get_peft_model(model, batches, lora_config(spec["rank"], spec["alpha"]), method=method,
                                           max_samples=spec["samples"], progress=False, **options)
    sync(spec["device"])
    wall = time.perf_counter() - started
    t = peft_model.loradafast_result.timings
    extra = {"loradafast_timings": dict(t), "options": dict(peft_model.loradafast_result.options)}
    fallbacks = [n for n, layer in peft_model.loradafast_result.layers.items()
                 if layer.diagnostics.get("eigensolver_fallback")]
    if fallbacks:
        extra["eigensolver_fallbacks"] = len(fallbacks)
    svd_paths = Counter(layer.diagnostics.get("svd") for layer in peft_model.loradafast_result.layers.values())
    svd_paths.pop(None, None)
    if svd_paths:  # lora-ga / lora-one: how many layers took the randomized SVD, the exact one, a fallback
        extra["svd_paths"] = dict(svd_paths)
    return {"pass_s": t["pass_s"], "solve_s": t["solve_s"], "apply_s": wall - t["pass_s"] - t["solve_s"],
            "extra": extra}


def run_peft_lora_ga(model, batches, spec):
    import peft
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga
    from peft.tuners.lora.layer import LoraLayer

    device = spec["device"]
    solve = {"s": 0.0, "layers": 0}
    original = LoraLayer.lora_ga_init

    def timed_lora_ga_init(self, *args, **kwargs):  # the per-layer SVD + base update inside get_peft_model
        sync(device)
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            sync(device)
            solve["s"] += time.perf_counter() - t0
            solve["layers"] += 1

    config = lora_config(spec["rank"], spec["alpha"], init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for b in batches:
            model(**b, use_cache=False).loss.backward()

    started = time.perf_counter()
    preprocess_loraga(model, config, train_step)
    sync(device)
    pass_s = time.perf_counter() - started
    LoraLayer.lora_ga_init = timed_lora_ga_init
    try:
        peft.get_peft_model(model, config)
    finally:
        LoraLayer.lora_ga_init = original
    sync(device)
    wall = time.perf_counter() - started
    return {"pass_s": pass_s, "solve_s": solve["s"], "apply_s": wall - pass_s - solve["s"],
            "extra": {"lora_ga_config": "LoraGAConfig() defaults: direction ArB2r, scale stable, stable_gamma 16",
                      "layers_solved": solve["layers"]}}


class EvaCapReached(RuntimeError):
    pass


def run_peft_eva(model, batches, spec):
    import peft
    from peft import EvaConfig, initialize_lora_eva_weights
    from peft.tuners.lora.eva import get_eva_state_dict

    device = spec["device"]
    cap = spec["eva_max_epochs"] * len(batches)
    count = {"n": 0}

    def forward_fn(m, inputs):  # PEFT's default forward_fn_dict, plus a batch counter and cap
        count["n"] += 1
        if count["n"] > cap:
            raise EvaCapReached(f"EVA did not converge within {cap} forward batches "
                                f"({spec['eva_max_epochs']} passes over the samples)")
        return m(**inputs, use_cache=False)

    config = lora_config(spec["rank"], spec["alpha"], init_lora_weights="eva", eva_config=EvaConfig())
    started = time.perf_counter()
    peft_model = peft.get_peft_model(model, config, low_cpu_mem_usage=True)
    sync(device)
    wrap_s = time.perf_counter() - started
    state = get_eva_state_dict(peft_model, batches, forward_fn=forward_fn, show_progress_bar=False)
    sync(device)
    pass_s = time.perf_counter() - started - wrap_s
    ranks = [int(v.shape[0]) for v in state.values()]  # before loading: PEFT consumes the dict
    initialize_lora_eva_weights(peft_model, eva_state_dict=state, show_progress_bar=False)
    sync(device)
    wall = time.perf_counter() - started
    return {"pass_s": pass_s, "solve_s": None, "apply_s": wall - pass_s,
            "extra": {"eva_config": "EvaConfig() defaults: rho 2.0, tau 0.99, use_label_mask, no whitening",
                      "forward_batches": count["n"], "passes_over_samples": count["n"] / len(batches),
                      "pass_includes": "forward passes and EVA's incremental PCA in its hooks (interleaved)",
                      "apply_includes": "get_peft_model wrap + loading the EVA state dict",
                      "rank_min": min(ranks) if ranks else None, "rank_max": max(ranks) if ranks else None}}


PROVIDERS = {
    "floor": run_floor,
    "floor-train": run_training_floor,
    **{name: partial(run_loradafast, name=name) for name in LORADAFAST_METHODS},
    "peft-lora-ga": run_peft_lora_ga,
    "peft-eva": run_peft_eva,
    "official-lora-da": run_official,
}


def run_method(name, model, batches, spec):
    if name not in PROVIDERS:
        raise ValueError(f"unknown method {name!r}")
    return PROVIDERS[name](model, batches, spec)
