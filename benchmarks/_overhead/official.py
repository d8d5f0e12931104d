"""The official LoRA-DA schedule, re-enacted with torch/PEFT calls: batch size 1, one gradient
pass, then one K-FAC pass per group of ``OFFICIAL_GROUP`` decoder layers, per-layer dense solves
with ``torch.lobpcg(niter=10)``, and a PEFT wrapper filled with the factors.  Faithful to the
cost structure (1 + ⌈layers/8⌉ passes, per-layer dense Ω), not to the numerics."""
from __future__ import annotations

import math
import time

import torch
from _common import sync

from .config import LORA_DA_DEFAULTS, OFFICIAL_GROUP, TARGETS
from .models import lora_config


def run_official(model, batches, spec):
    """The whole schedule; returns the pass / solve / apply split like every method."""
    device = spec["device"]
    seqs = [b["input_ids"][i:i + 1] for b in batches for i in range(b["input_ids"].shape[0])]
    targets = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in TARGETS}
    layer_of = {name: int(name.split(".layers.")[1].split(".")[0]) for name in targets}
    num_layers = max(layer_of.values()) + 1
    torch.manual_seed(0)  # lobpcg's random start

    started = time.perf_counter()
    grads = gradient_pass(model, targets, seqs)  # 1.
    sync(device)
    pass_s = time.perf_counter() - started
    solve_s = 0.0
    factors_a, factors_b = {}, {}
    fallbacks = 0
    groups = [list(range(i, min(i + OFFICIAL_GROUP, num_layers))) for i in range(0, num_layers, OFFICIAL_GROUP)]
    for group in groups:
        t0 = time.perf_counter()
        names = [n for n in targets if layer_of[n] in group]
        z, y, tokens = kfac_group_pass(model, targets, names, seqs, device)  # 2.
        sync(device)
        t1 = time.perf_counter()
        pass_s += t1 - t0
        for n in names:  # 3.
            Z = z.pop(n) / tokens[n] + LORA_DA_DEFAULTS["damping"] * torch.eye(targets[n].in_features, device=device)
            Y = y.pop(n) / tokens[n] + LORA_DA_DEFAULTS["damping"]
            factors_a[n], factors_b[n], fell_back = dense_layer_solve(grads.pop(n), Z, Y, spec["rank"])
            fallbacks += fell_back
        sync(device)
        solve_s += time.perf_counter() - t1
    t0 = time.perf_counter()
    apply_factors(model, spec, factors_a, factors_b)  # 4.
    sync(device)
    apply_s = time.perf_counter() - t0
    return {"pass_s": pass_s, "solve_s": solve_s, "apply_s": apply_s,
            "extra": {"passes": 1 + len(groups), "groups": len(groups), "batch_size": 1,
                      "lobpcg_failures_fell_back_to_eigh": fallbacks, "layers": len(targets)}}


def gradient_pass(model, targets: dict, seqs: list) -> dict:
    """1. The weight gradients of the target layers in ``.grad``, batch size 1, averaged."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    with torch.enable_grad():
        for x in seqs:
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
    grads = {}
    for name, m in targets.items():
        grads[name] = m.weight.grad.float() / len(seqs)
        m.weight.grad = None
        m.weight.requires_grad_(False)
    return grads


def kfac_group_pass(model, targets: dict, names: list, seqs: list, device):
    """2. One forward+backward over the samples collecting Σxxᵀ and Σg² of one group's layers with
    hooks; only that group's weights require grad, so backward stops below the group."""
    z = {n: torch.zeros(targets[n].in_features, targets[n].in_features, device=device) for n in names}
    y = {n: torch.zeros(targets[n].out_features, device=device) for n in names}
    tokens = {n: 0 for n in names}

    def forward_hook(name):
        def hook(module, args, output):
            xs = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            z[name].addmm_(xs.T, xs)
            tokens[name] += xs.shape[0]

            def grad_hook(g):
                g = g.reshape(-1, g.shape[-1]).float()
                y[name].add_((g * g).sum(0))
            output.register_hook(grad_hook)
        return hook

    handles = [targets[n].register_forward_hook(forward_hook(n)) for n in names]
    for n in names:
        targets[n].weight.requires_grad_(True)
    try:
        with torch.enable_grad():
            for x in seqs:
                model(input_ids=x, labels=x, use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n in names:
            targets[n].weight.grad = None
            targets[n].weight.requires_grad_(False)
    return z, y, tokens


def dense_layer_solve(grad, Z, Y, r: int):
    """3. Dense Ω with explicit inverses, ``torch.lobpcg(niter=10)``, ``eigh`` when lobpcg raises.
    Returns ``(lora_A, lora_B, 1 if it fell back else 0)``."""
    beta, gamma, n_train = LORA_DA_DEFAULTS["beta"], LORA_DA_DEFAULTS["gamma"], LORA_DA_DEFAULTS["num_train_samples"]
    z_inv = torch.linalg.inv(Z)
    y_inv = 1.0 / Y
    delta = -(y_inv[:, None] * (grad @ z_inv))
    sigma = torch.linalg.matrix_norm(delta, ord=2)
    d_hat = delta / sigma
    omega = beta * y_inv.sum() / (n_train * sigma ** 2) * z_inv - d_hat.T @ d_hat
    omega = 0.5 * (omega + omega.T)
    fell_back = 0
    try:
        _, vectors = torch.lobpcg(omega, k=r, largest=False, niter=10)
    except Exception:  # noqa: BLE001 - torch.lobpcg raises on some inputs; the official code would stop
        fell_back = 1
        vectors = torch.linalg.eigh(omega)[1][:, :r]
    return ((vectors.T / math.sqrt(gamma)).contiguous(), (d_hat @ vectors / math.sqrt(gamma)).contiguous(),
            fell_back)


def apply_factors(model, spec, factors_a: dict, factors_b: dict):
    """4. A PEFT LoRA wrapper filled with the factors (base weights unchanged)."""
    import peft

    peft_model = peft.get_peft_model(model, lora_config(spec["rank"], spec["alpha"]))
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name in factors_a and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(factors_a[name])
                module.lora_B["default"].weight.copy_(factors_b[name])
    return peft_model
