"""Quality benchmark (issue 15): fine-tune SmolLM2-135M from each LoRA initialisation under the same
budget and compare held-out quality.

    python benchmarks/quality.py --profile cpu            # ~45-60 min on 2 shared cores (rank 8)
    python benchmarks/quality.py --profile gpu            # full protocol: ranks 8 and 32, all methods
    python benchmarks/quality.py --profile gpu --smoke    # 2 steps, 1 method, 1 LR: checks it starts
    python benchmarks/quality.py --data my.jsonl          # any JSONL (question/answer) or text file

Protocol (the same for every method): LoRA (α = 2r, dropout 0) on every linear layer of the decoder
(PEFT's "all-linear": not lm_head); AdamW, warm-up then cosine decay, gradient clipping at 1; one
pass over the training problems in a seed-fixed order shared by all methods; loss on the answer
tokens only.  Per method an LR sweep at seed 0; the best LR is the one with the lowest training loss
over the last quarter of the steps (one epoch, so each batch is unseen when its loss is taken: an
online validation loss that never looks at the held-out split); that LR is then rerun at the other
seeds.  The seed fixes the data order (and the random A of `lora` / LoRA-FA), nothing else.
Reported: held-out answer NLL, greedy exact match of the final number, loss curves, init time.
Results: benchmarks/results/quality_<device>.json, one entry per configuration (``--config KEY``:
default ``default``, ``smoke`` with ``--smoke``; the file's other entries are kept), rewritten after
every run, and a PNG of the loss curves when matplotlib is installed (``quality_<device>.png`` for
the entry ``default``, ``quality_<device>_<KEY>.png`` for another).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import re
import statistics as st
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import loradafast  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ENTRIES,
    config_key,
    device_name,
    figure_path,
    pyplot,
    read_entries,
    results_path,
    write_entry,
    write_json,
)

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "gsm8k_test.jsonl"

# Every method of the issue.  kind: how the initialisation is built (see build_inits);
# parent: whose best LR a method inherits when a profile does not sweep it.
METHODS = {
    "lora": {"kind": "lora"},
    "pissa": {"kind": "weights", "method": "pissa", "parent": "lora"},
    "milora": {"kind": "weights", "method": "milora", "parent": "pissa"},
    "lora-ga": {"kind": "stats", "method": "lora-ga", "parent": "pissa"},
    "peft-lora-ga": {"kind": "peft-lora-ga", "parent": "pissa"},
    "peft-eva": {"kind": "peft-eva", "parent": "lora"},
    "lora-one": {"kind": "stats", "method": "lora-one", "parent": "lora"},
    "lora-da": {"kind": "stats", "method": "lora-da"},  # diag Y, γ = 1024: the defaults
    "lora-da-full": {"kind": "stats", "method": "lora-da", "y_factor": "full", "parent": "lora-da"},
    "lora-da-beta0": {"kind": "stats", "method": "lora-da", "beta": 0.0, "parent": "lora-da"},
    "lora-da-raw": {"kind": "stats", "method": "lora-da", "gradient": "raw", "parent": "lora-da"},
    # candidates for the default (issue 25): the split-half study's strong relative damping
    "lora-da-rel10": {"kind": "stats", "method": "lora-da", "damping_mode": "relative", "damping": 10.0,
                      "parent": "lora-da"},
    "lora-da-rel1": {"kind": "stats", "method": "lora-da", "damping_mode": "relative", "damping": 1.0,
                     "parent": "lora-da"},
    "lora-da-g16": {"kind": "gamma", "gamma": 16, "parent": "lora-da"},
    "lora-da-g64": {"kind": "gamma", "gamma": 64, "parent": "lora-da"},
    "lora-da-g256": {"kind": "gamma", "gamma": 256, "parent": "lora-da"},
    "lora-fa-random": {"kind": "lora", "freeze_a": True, "parent": "lora"},
    "lora-fa-da": {"kind": "gamma", "gamma": 1024, "freeze_a": True, "parent": "lora-da"},
    # LoRA-DA's A0 frozen at γ = 16: A's scale (row norm 1/√γ) sets how far each Adam step on B moves BA
    "lora-fa-da-g16": {"kind": "gamma", "gamma": 16, "freeze_a": True, "parent": "lora-da"},
}

# swept: LR sweep + all seeds; inherited: one run at the parent's best LR, seed 0.
PROFILES = {
    "cpu": {  # sized for 2 shared cores: see the README section for what it leaves out
        "ranks": [8], "steps": 12, "batch_size": 4, "seq_len": 128, "init_samples": 16,
        "heldout_eval": 24, "eval_len": 320, "em_problems": 20, "em_new_tokens": 96, "em_seeds": [1],
        "seeds": [0, 1, 2], "lrs": [3e-4, 1e-3, 3e-3], "extend_edges": 0, "warmup_frac": 0.1,
        # lora-da-rel10 and lora-one: the candidates for the default (issue 25), at 3 seeds
        "swept": ["lora", "lora-da", "lora-da-rel10", "lora-one"],
        # most informative first (the run may be cut short); the γ variants and LoRA-FA reuse
        # lora-da's solve, the ablations re-solve
        "inherited": ["lora-da-g16", "pissa", "lora-fa-da", "lora-fa-random", "lora-da-g256",
                      "lora-ga", "peft-lora-ga", "lora-da-beta0", "lora-da-raw", "lora-da-full", "milora",
                      "lora-fa-da-g16"],
        "eva_max_epochs": 3,
    },
    "gpu": {
        "ranks": [8, 32], "steps": 120, "batch_size": 8, "seq_len": 512, "init_samples": 256,
        "heldout_eval": None, "eval_len": 512, "em_problems": None, "em_new_tokens": 256, "em_seeds": [1, 2],
        "seeds": [0, 1, 2], "lrs": [1e-4, 3e-4, 1e-3, 3e-3], "extend_edges": 1, "warmup_frac": 0.1,
        "swept": list(METHODS), "inherited": [], "eva_max_epochs": 20,
    },
}
SMOKE = {"steps": 2, "batch_size": 2, "seq_len": 64, "init_samples": 4, "heldout_eval": 4, "eval_len": 96,
         "em_problems": 2, "em_new_tokens": 8, "em_seeds": [1], "seeds": [0, 1], "lrs": [1e-3], "extend_edges": 0,
         "ranks": [8], "swept": ["lora-da"], "inherited": []}

# Two-sided 95 % quantiles of Student's t, df = 1..10 (no scipy in the venv).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


# ------------------------------------------------------------------------------------------------
# pure helpers (tested in tests/benchmarks/test_quality_bench.py)
# ------------------------------------------------------------------------------------------------
def read_records(path: Path, text_chunk_chars: int = 2000) -> list[dict]:
    """JSONL with question/answer (or text) fields, or plain text cut into chunks at blank lines.

    A record is {"prompt": str, "answer": str}; the loss is taken on the answer only.
    """
    raw = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".jsonl":
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        return [{"prompt": f"Question: {r['question']}\nAnswer:", "answer": " " + r["answer"]}
                if "question" in r else {"prompt": "", "answer": r["text"]} for r in rows]
    records, buf = [], ""
    for para in re.split(r"\n\s*\n", raw):
        buf = f"{buf}\n\n{para}" if buf else para
        if len(buf) >= text_chunk_chars:
            records.append({"prompt": "", "answer": buf})
            buf = ""
    if buf:
        records.append({"prompt": "", "answer": buf})
    return records


def split_records(n: int, train_count: int) -> tuple[range, range]:
    """First ``train_count`` records train (and give the init samples), the rest are held out;
    at least a fifth of a file is held out, so small files keep a held-out part."""
    k = min(train_count, n - max(1, n // 5))
    return range(0, k), range(k, n)


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the number after '####', else the last number."""
    text = text.split("\nQuestion:")[0]  # the model may start a new problem after its answer
    tail = text.split("####")[-1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    if not nums:
        return None
    value = nums[0] if "####" in text else nums[-1]
    value = value.replace(",", "").rstrip(".")
    return str(float(value)).removesuffix(".0") if "." in value else str(int(value))


def lr_schedule(step: int, steps: int, warmup_frac: float) -> float:
    """Multiplier of the LR: linear warm-up, then cosine decay to zero at the end."""
    warm = max(1, round(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1 + math.cos(math.pi * progress))


def tail_loss(curve: list[float]) -> float:
    """Mean training loss over the last quarter of the steps (NaN/inf if the run diverged)."""
    k = max(1, len(curve) // 4)
    tail = curve[-k:]
    return sum(tail) / len(tail) if all(math.isfinite(x) for x in tail) else math.inf


def best_lr(scores: dict[float, float]) -> tuple[float, float | None]:
    """(best LR, the LR to try next if the best sits on an edge of the grid, else None)."""
    lrs = sorted(scores)
    best = min(lrs, key=lambda lr: scores[lr])
    if not math.isfinite(scores[best]):
        return best, None
    if len(lrs) >= 2 and best == lrs[0]:
        return best, lrs[0] * lrs[0] / lrs[1]  # one more step down, same ratio
    if len(lrs) >= 2 and best == lrs[-1]:
        return best, lrs[-1] * lrs[-1] / lrs[-2]
    return best, None


def mean_std(xs: list[float]) -> tuple[float, float]:
    return st.mean(xs), (st.stdev(xs) if len(xs) > 1 else float("nan"))


def paired_test(a: list[float], b: list[float]) -> dict:
    """Paired t-test of a − b over seeds (the seeds share the data order across methods)."""
    d = [x - y for x, y in zip(a, b)]
    mean, sd = mean_std(d)
    n = len(d)
    if n < 2 or not math.isfinite(sd):
        return {"mean_diff": mean, "sd_diff": sd, "n": n, "exceeds_noise": None}
    half = T975[min(n - 1, len(T975)) - 1] * sd / math.sqrt(n)
    return {"mean_diff": mean, "sd_diff": sd, "n": n, "ci95_half": half, "exceeds_noise": abs(mean) > half}


# ------------------------------------------------------------------------------------------------
# data: tokenised (prompt, answer) pairs, loss on the answer tokens
# ------------------------------------------------------------------------------------------------
def encode(tokenizer, record: dict, max_len: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) truncated to ``max_len``; None when fewer than 4 answer tokens remain."""
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"] if record["prompt"] else []
    answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_len]
    labels = ([-100] * len(prompt) + answer)[:max_len]
    return (ids, labels) if sum(x != -100 for x in labels) >= 4 else None


def collate(pairs, pad_id: int, device) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on the prompt and padding)."""
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def training_batches(pool: list, seed: int, steps: int, batch_size: int, pad_id: int, device) -> list[dict]:
    """One epoch in a seed-fixed order, identical for every method at this seed."""
    if steps * batch_size > len(pool):
        raise SystemExit(f"{steps} steps × {batch_size} need {steps * batch_size} training records; "
                         f"only {len(pool)} fit (one epoch keeps the training loss an unseen-data loss)")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
    return [collate([pool[j] for j in order[i * batch_size:(i + 1) * batch_size]], pad_id, device)
            for i in range(steps)]


def answer_nll(model, batch) -> tuple[torch.Tensor, int]:
    """Summed NLL of the answer tokens and their count.  The LM head runs on those positions only
    (it is a fifth of SmolLM2's compute and most positions are prompt)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = core.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = core.lm_head(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def heldout_nll(model, batches: list[dict]) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        nll, n = answer_nll(model, b)
        total, count = total + float(nll), count + n
    return total / count


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], new_tokens: int, device, batch_size: int = 20) -> dict:
    """Greedy decoding; correct when the final number equals the reference's."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct, samples = 0, []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in chunk]
        width = max(map(len, prompts))  # left padding, so every prompt ends where generation starts
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for r, seq in zip(chunk, out[:, width:]):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            ok = final_number(text) is not None and final_number(text) == final_number(r["answer"])
            correct += ok
            if len(samples) < 3:
                samples.append({"generated": text[:300], "reference": final_number(r["answer"]), "correct": ok})
    return {"correct": correct, "total": len(records), "accuracy": correct / len(records), "examples": samples}


# ------------------------------------------------------------------------------------------------
# initialisations: one statistics pass shared by every data-aware method of loradafast
# ------------------------------------------------------------------------------------------------
def lora_config(rank: int, **extra):
    from peft import LoraConfig

    extra.setdefault("target_modules", "all-linear")
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, **extra)


def all_linear_names(model) -> list[str]:
    """The module names PEFT's "all-linear" selects: every ``nn.Linear`` but the output embedding."""
    head = model.get_output_embeddings()
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and module is not head)


def diag_from_full(stats):
    """Diag-Y statistics from a full-Y pass: Σg² is the diagonal of Σggᵀ, G and Z are the same.
    One pass then serves LoRA-DA with both Y factors (collect takes one y_factor per pass)."""
    layers = {n: dataclasses.replace(s, y_sum=torch.diagonal(s.y_sum).clone()) for n, s in stats.layers.items()}
    return loradafast.Statistics(layers, stats.z_sums, stats.num_tokens, stats.num_sequences, "diag",
                                 dict(stats.meta))


def rescaled(result, gamma: float, freeze_a: bool):
    """LoRA-DA at another γ from the γ = 1024 solve: A = A0ᵀ/√γ and B = Δ̂A0/√γ, so both factors
    scale by √(1024/γ) exactly; no second eigensolve."""
    c = math.sqrt(result.options["gamma"] / gamma)
    layers = {n: dataclasses.replace(l, lora_A=l.lora_A * c, lora_B=l.lora_B * c) for n, l in result.layers.items()}
    return dataclasses.replace(result, layers=layers, freeze_a=freeze_a,
                               options=dict(result.options, gamma=gamma), timings={"solve_s": 0.0})


class Inits:
    """Builds each method's initialised PeftModel on a fresh copy of the base model; the
    deterministic parts (statistics, solves, PEFT templates) are computed once and cached."""

    def __init__(self, base, init_batches: list[dict], rank: int, cfg: dict):
        self.base, self.batches, self.rank, self.cfg = base, init_batches, rank, cfg
        self.cache, self.timings, self._stats = {}, {}, None

    def stats(self, y_factor: str):
        if self._stats is None:
            t = time.perf_counter()
            full = loradafast.collect(self.base, self.batches, y_factor="full", max_samples=None, progress=False)
            self._stats = {"full": full, "diag": diag_from_full(full)}
            self.timings["shared_pass_full_y_s"] = time.perf_counter() - t
        return self._stats[y_factor]

    def wrap(self):
        import peft

        return peft.get_peft_model(copy.deepcopy(self.base), lora_config(self.rank))

    def result(self, name: str):
        """The InitResult of a deterministic loradafast method (cached)."""
        if name in self.cache:
            return self.cache[name]
        spec, alpha = METHODS[name], 2 * self.rank
        if spec["kind"] == "weights":
            res = loradafast.initialize(self.base, None, self.rank, method=spec["method"], lora_alpha=alpha,
                                        progress=False)
            info = {"total_s": res.timings["total_s"]}
        elif spec["kind"] == "stats":
            stats = self.stats(spec.get("y_factor", "diag"))
            options = {k: spec[k] for k in ("beta", "gradient", "damping", "damping_mode") if k in spec}
            res = loradafast.solve(stats, self.rank, method=spec["method"], lora_alpha=alpha, **options)
            info = {"shared_pass_s": self.timings["shared_pass_full_y_s"], "solve_s": res.timings["solve_s"]}
        else:  # gamma: from lora-da's solve
            res = rescaled(self.result("lora-da"), spec["gamma"], spec.get("freeze_a", False))
            info = {"derived_from": "lora-da (γ=1024) by exact rescaling", "solve_s": 0.0}
        self.cache[name], self.timings[name] = res, info
        return res

    def model(self, name: str, seed: int):
        kind = METHODS[name]["kind"]
        if kind == "lora":
            model = self.wrap()
            res = loradafast.initialize(model, None, method="lora", seed=seed,
                                        freeze_a=METHODS[name].get("freeze_a", False), progress=False)
            self.timings.setdefault(name, {"total_s": res.timings["total_s"]})
            return model
        if kind in ("peft-lora-ga", "peft-eva"):
            if name not in self.cache:
                t = time.perf_counter()
                self.cache[name] = (peft_lora_ga if kind == "peft-lora-ga" else peft_eva)(self)
                self.timings[name] = {"total_s": time.perf_counter() - t, **self.timings.get(name, {})}
            return copy.deepcopy(self.cache[name])
        model = self.wrap()
        self.result(name).apply_to(model)
        return model


def peft_lora_ga(inits: Inits):
    """PEFT's own LoRA-GA at its defaults (LoraGAConfig: ArB2r, stable scale γ = 16)."""
    import peft
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    model = copy.deepcopy(inits.base)
    # preprocess_loraga does not expand "all-linear" (peft 0.21: "No supported layers found"), so
    # the same layers are named: every Linear of the model but its output embedding.
    config = lora_config(inits.rank, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(),
                         target_modules=all_linear_names(model))

    def train_step():
        for b in inits.batches:
            model(**b, use_cache=False).loss.backward()

    preprocess_loraga(model, config, train_step)
    return peft.get_peft_model(model, config)


def peft_eva(inits: Inits):
    """PEFT's EVA at its defaults (EvaConfig: ρ = 2, τ = 0.99).  EVA cycles the samples until its
    incremental PCA converges; after ``eva_max_epochs`` passes it is stopped and the method is
    recorded as failed (not converged) rather than run at ranks it has not settled."""
    import peft
    from peft import EvaConfig, initialize_lora_eva_weights
    from peft.tuners.lora.eva import get_eva_state_dict

    cap, count = inits.cfg["eva_max_epochs"] * len(inits.batches), {"n": 0}
    batches = [{k: v for k, v in b.items()} for b in inits.batches]

    def forward_fn(m, inputs):
        count["n"] += 1
        if count["n"] > cap:
            raise RuntimeError(f"EVA did not converge within {cap} forward batches")
        return m(**inputs, use_cache=False)

    config = lora_config(inits.rank, init_lora_weights="eva", eva_config=EvaConfig())
    model = peft.get_peft_model(copy.deepcopy(inits.base), config, low_cpu_mem_usage=True)
    state = get_eva_state_dict(model, batches, forward_fn=forward_fn, show_progress_bar=False)
    initialize_lora_eva_weights(model, eva_state_dict=state, show_progress_bar=False)
    inits.timings["peft-eva"] = {"forward_batches": count["n"], "cap_batches": cap}
    return model


# ------------------------------------------------------------------------------------------------
# training and the diagnostics that explain the results
# ------------------------------------------------------------------------------------------------
def lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from peft.tuners.lora import LoraLayer

    return {n: (m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"])
            for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def init_scale(model) -> dict:
    """Medians over layers of ‖A‖_F/√r (PEFT's kaiming A gives ≈ 0.58) and ‖s·BA‖_F at the start."""
    a_rows, delta = [], []
    for a, b, s in lora_factors(model).values():
        a_rows.append(float(a.norm()) / math.sqrt(a.shape[0]))
        delta.append(float((s * b @ a).norm()))
    return {"a_row_norm_median": st.median(a_rows), "sBA_fro_median": st.median(delta)}


@torch.no_grad()
def a_movement(start: dict, model) -> dict:
    """How much of the initial A survives training: medians over layers of ‖A_T − A_0‖/‖A_0‖ and of
    the subspace overlap ‖Q_T Q_0ᵀ‖²_F / r between the row spaces (1: same span, r/in: random)."""
    drift, overlap = [], []
    for name, (a, _, _) in lora_factors(model).items():
        a0 = start[name]
        drift.append(float((a - a0).norm() / a0.norm().clamp_min(1e-30)))
        q0, qt = torch.linalg.qr(a0.double().T)[0], torch.linalg.qr(a.double().T)[0]
        overlap.append(float((qt.T @ q0).pow(2).sum()) / a0.shape[0])
    return {"a_rel_change_median": st.median(drift), "a_subspace_overlap_median": st.median(overlap)}


def train(model, batches: list[dict], lr: float, warmup_frac: float) -> dict:
    """AdamW over the trainable (LoRA) parameters; the loss of each batch is taken before the
    update on it, so with one epoch the curve is a loss on unseen data."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, len(batches), warmup_frac))
    model.train()
    curve, norms, started = [], [], time.perf_counter()
    for batch in batches:
        nll, n = answer_nll(model, batch)
        loss = nll / n
        if not torch.isfinite(loss):
            curve.append(math.inf)
            break
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(float(loss.detach()))
    return {"curve": curve, "grad_norms": norms, "train_s": time.perf_counter() - started,
            "diverged": not all(math.isfinite(x) for x in curve)}


def one_run(ctx: dict, inits: Inits, name: str, lr: float, seed: int, phase: str) -> dict:
    """Initialise, train, evaluate; every failure is recorded, not raised (one bad method must not
    cost the others' results)."""
    cfg = ctx["cfg"]
    record = {"rank": inits.rank, "method": name, "lr": lr, "seed": seed, "phase": phase}
    try:
        t = time.perf_counter()
        torch.manual_seed(seed)
        model = inits.model(name, seed).to(ctx["device"])
        record["build_s"] = time.perf_counter() - t
        record["init_scale"] = init_scale(model)
        start = {n: a.detach().clone() for n, (a, _, _) in lora_factors(model).items()}
        record.update(train(model, ctx["batches"][seed], lr, cfg["warmup_frac"]))
        record["tail_loss"] = tail_loss(record["curve"])
        record["a_movement"] = a_movement(start, model)
        if not record["diverged"]:
            t = time.perf_counter()
            record["heldout_nll"] = heldout_nll(model, ctx["heldout"])
            record["eval_s"] = time.perf_counter() - t
            if seed in cfg["em_seeds"] and phase != "sweep" and ctx["em_records"]:
                t = time.perf_counter()
                record["exact_match"] = exact_match(model, ctx["tokenizer"], ctx["em_records"],
                                                    cfg["em_new_tokens"], ctx["device"])
                record["em_s"] = time.perf_counter() - t
    except Exception as err:  # noqa: BLE001 - recorded in the JSON and printed
        record["error"] = f"{type(err).__name__}: {err}"
    print(f"[{time.perf_counter() - ctx['t0']:7.0f}s] r={inits.rank} {name:15s} lr={lr:.0e} seed={seed} "
          f"{phase:6s} tail={record.get('tail_loss', float('nan')):.4f} "
          f"heldout={record.get('heldout_nll', float('nan')):.4f} {record.get('error', '')}", flush=True)
    return record


# ------------------------------------------------------------------------------------------------
# the protocol: sweeps at seed 0, the other seeds at the best LR, then the inherited methods
# ------------------------------------------------------------------------------------------------
def run_rank(ctx: dict, rank: int) -> None:
    cfg, out = ctx["cfg"], ctx["out"]
    inits = Inits(ctx["base"], ctx["init_batches"], rank, cfg)
    best = out["best_lr"].setdefault(str(rank), {})
    out["init_timings"][str(rank)] = inits.timings

    def run(name, lr, seed, phase):
        done = [r for r in ctx.get("previous", []) if str(r["rank"]) == str(rank) and r["method"] == name
                and r["lr"] == lr and r["seed"] == seed]
        out["runs"].append(done[0] if done else one_run(ctx, inits, name, lr, seed, phase))
        save(ctx)
        return out["runs"][-1]

    for name in cfg["swept"]:
        scores = {lr: run(name, lr, 0, "sweep").get("tail_loss", math.inf) for lr in cfg["lrs"]}
        for _ in range(cfg["extend_edges"]):  # the best LR on an edge: one more point beyond it
            _, extra = best_lr(scores)
            if extra is None:
                break
            scores[extra] = run(name, extra, 0, "sweep").get("tail_loss", math.inf)
        best[name] = best_lr(scores)[0]
    for name in cfg["swept"]:
        for seed in cfg["seeds"][1:]:
            run(name, best[name], seed, "seeds")
    for name in cfg["inherited"]:
        parent = METHODS[name].get("parent")
        best[name] = best.get(parent, sorted(cfg["lrs"])[len(cfg["lrs"]) // 2])
        run(name, best[name], 0, "single")


def summarize(out: dict) -> dict:
    """Per rank and method at its best LR: held-out NLL mean ± std over seeds, paired tests against
    lora and lora-da (same seeds, same data order), exact match, start loss, init time."""
    summary = {}
    for rank, best in out["best_lr"].items():
        rows = {}
        for name, lr in best.items():
            runs = sorted((r for r in out["runs"] if str(r["rank"]) == rank and r["method"] == name
                           and r["lr"] == lr and "heldout_nll" in r), key=lambda r: r["seed"])
            if not runs:
                continue
            nll = [r["heldout_nll"] for r in runs]
            em = [r["exact_match"]["accuracy"] for r in runs if "exact_match" in r]
            rows[name] = {"lr": lr, "seeds": [r["seed"] for r in runs], "heldout_nll": nll,
                          "mean": mean_std(nll)[0], "std": mean_std(nll)[1],
                          "exact_match": em, "start_loss": runs[0]["curve"][0],
                          "lr_sweep": {r["lr"]: r.get("tail_loss") for r in out["runs"]
                                       if str(r["rank"]) == rank and r["method"] == name and r["seed"] == 0}}
        for name, row in rows.items():
            for ref in ("lora", "lora-da"):
                if ref in rows and ref != name and len(row["seeds"]) > 1 and row["seeds"] == rows[ref]["seeds"]:
                    row[f"vs_{ref}"] = paired_test(row["heldout_nll"], rows[ref]["heldout_nll"])
        summary[rank] = rows
    return summary


def markdown_table(summary: dict, timings: dict) -> str:
    lines = []
    for rank, rows in summary.items():
        header = ("| method | LR | held-out NLL (mean ± std, n) | Δ vs lora (paired 95 % CI) | exact match "
                  "| step-0 loss | init s |")
        lines += [f"\nrank {rank}\n", header, "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in sorted(rows.items(), key=lambda kv: kv[1]["mean"]):
            v = r.get("vs_lora")
            delta = (f"{v['mean_diff']:+.4f} ± {v['ci95_half']:.4f}{' *' if v['exceeds_noise'] else ''}"
                     if v and v.get("exceeds_noise") is not None else "—")
            em = f"{st.mean(r['exact_match']):.1%} (n={len(r['exact_match'])})" if r["exact_match"] else "—"
            t = timings.get(rank, {}).get(name, {})
            init_s = t.get("solve_s", t.get("total_s"))
            init_s = f"{init_s:.1f}" + (" + pass" if "shared_pass_s" in t else "") if init_s is not None else "—"
            std = f" ± {r['std']:.4f}" if len(r["seeds"]) > 1 else ""
            lines.append(f"| {name} | {r['lr']:.0e} | {r['mean']:.4f}{std} ({len(r['seeds'])}) | {delta} | {em} "
                         f"| {r['start_loss']:.4f} | {init_s} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def save(ctx: dict) -> None:
    """The run's entry of the results file, rewritten after every run, so an interrupted profile
    keeps what it measured (the file's other entries are kept)."""
    out = ctx["out"]
    out["wall_s"] = time.perf_counter() - ctx["t0"]
    out["summary"] = summarize(out)
    write_entry(out, ctx["path"], ctx["key"], benchmark="quality", device=ctx["device"], indent=1, quiet=True)


def read_record(path: Path, key: str) -> dict:
    """The record of entry ``key`` of the results file ``path`` (a file of the former layout, a
    single record, is read as it is)."""
    entries = read_entries(path)
    if not entries:
        return json.loads(Path(path).read_text())
    if key not in entries:
        raise SystemExit(f"{path} has no entry {key!r}; its entries: {', '.join(entries)}")
    return entries[key]


def plot(out: dict, path: Path) -> str:
    """Training-loss curves at each method's best LR (mean over seeds); needs matplotlib."""
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no PNG written"
    ranks = list(out["summary"])
    fig, axes = plt.subplots(1, len(ranks), figsize=(8 * len(ranks), 6), squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        for name, row in out["summary"][rank].items():
            curves = [r["curve"] for r in out["runs"] if str(r["rank"]) == rank and r["method"] == name
                      and r["lr"] == row["lr"] and "heldout_nll" in r]
            mean = [st.mean(c[i] for c in curves) for i in range(min(map(len, curves)))]
            ax.plot(range(1, len(mean) + 1), mean, label=f"{name} (lr {row['lr']:.0e})",
                    linestyle="-" if len(curves) > 1 else ":")
        ax.set(title=f"rank {rank}: training loss at the best LR (dotted: 1 seed)", xlabel="step",
               ylabel="answer-token NLL (before the step's update)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


def load_data(args, cfg: dict, tokenizer, device) -> dict:
    records = read_records(Path(args.data))
    train_idx, held_idx = split_records(len(records), args.train_records)
    pool = [p for p in (encode(tokenizer, records[i], cfg["seq_len"]) for i in train_idx) if p is not None]
    held = [records[i] for i in held_idx][:cfg["heldout_eval"]]
    encoded = (encode(tokenizer, r, cfg["eval_len"]) for r in held)
    held_pairs = sorted((p for p in encoded if p), key=lambda p: len(p[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    numeric = all(final_number(r["answer"]) is not None for r in held[:20]) and any(r["prompt"] for r in held)
    em_records = [records[i] for i in held_idx][:cfg["em_problems"]] if numeric else []
    return {
        "pool": pool, "pad": pad, "em_records": em_records,
        "init_batches": [collate(pool[:cfg["init_samples"]][i:i + cfg["batch_size"]], pad, device)
                         for i in range(0, cfg["init_samples"], cfg["batch_size"])],
        "heldout": [collate(held_pairs[i:i + 8], pad, device) for i in range(0, len(held_pairs), 8)],
        "batches": {s: training_batches(pool, s, cfg["steps"], cfg["batch_size"], pad, device) for s in cfg["seeds"]},
        "meta": {"path": str(args.data), "records": len(records), "train_records": [train_idx.start, train_idx.stop],
                 "heldout_records": [held_idx.start, held_idx.stop], "train_usable": len(pool),
                 "init_samples": "the first init_samples usable training records (file order)",
                 "heldout_evaluated": len(held_pairs), "exact_match_problems": len(em_records)},
    }


def report(path: Path, key: str | None = None) -> None:
    """Re-summarise each entry of a results file (or only entry ``key``), e.g. one whose run was
    stopped early, print its table and redraw its figure; a file of the former layout, a single
    record, is re-summarised as it is."""
    data = json.loads(path.read_text())
    if not (isinstance(data, dict) and isinstance(data.get(ENTRIES), dict)):  # the former layout
        summarise_record(data)
        write_json(data, path, indent=1)
        print(plot(data, path.with_suffix(".png")))
        return
    entries = data[ENTRIES]
    if key is not None and key not in entries:
        raise SystemExit(f"{path} has no entry {key!r}; its entries: {', '.join(entries)}")
    chosen = [name for name in entries if key in (None, name)]
    for name in chosen:
        print(f"entry {name!r}")
        summarise_record(entries[name])
    write_json(data, path, indent=1)  # the other entries as they were
    for name in chosen:
        print(plot(entries[name], figure_path(path, name)))


def summarise_record(out: dict) -> None:
    """Re-derive a record's best LRs (also from an incomplete sweep) and summary, and print its table."""
    out["best_lr"] = {rank: {name: float(lr) for name, lr in best.items()} for rank, best in out["best_lr"].items()}
    for r in out["runs"]:  # a stopped run: methods whose sweep had not finished get the best LR so far
        best = out["best_lr"].setdefault(str(r["rank"]), {})
        if r["method"] not in best and r["seed"] == 0:
            scores = {x["lr"]: x.get("tail_loss", math.inf) for x in out["runs"]
                      if x["rank"] == r["rank"] and x["method"] == r["method"] and x["seed"] == 0}
            best[r["method"]] = best_lr(scores)[0]
            out.setdefault("best_lr_from_incomplete_sweep", []).append(f"{r['rank']}/{r['method']}")
    out["summary"] = summarize(out)
    print(markdown_table(out["summary"], out["init_timings"]))


def resumable_runs(path: Path, out: dict, key: str) -> tuple[list[dict], dict | None]:
    """The runs and the base model's evaluation of entry ``key`` of an earlier results file,
    refused unless it ran the same settings and data."""
    old = read_record(path, key)
    # The data file may have moved, and methods may be added to a profile: runs are matched by
    # method, rank, LR and seed, so neither the path nor the method lists need to agree.
    ignored = {"path", "swept", "inherited"}

    def same(key):
        a, b = (json.loads(json.dumps(d.get(key), default=str)) for d in (old, out))
        return {k: v for k, v in a.items() if k not in ignored} == {k: v for k, v in b.items() if k not in ignored} \
            if isinstance(a, dict) and isinstance(b, dict) else a == b

    for key in ("settings", "data", "model"):
        if not same(key):
            raise SystemExit(f"--resume {path}: its {key!r} differ from this run's; its runs cannot be reused")
    out["resumed_from"] = {"path": str(path), "entry": key, "date": old.get("date"), "runs": len(old["runs"]),
                           "note": "reused runs keep their own wall times (their machine load); the base "
                                   "model's evaluation is reused too"}
    return [r for r in old["runs"] if "error" not in r], old.get("base_model")  # failed runs run again


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 1 method, 1 LR: checks that it runs")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL (question/answer or text) or text file")
    parser.add_argument("--train-records", type=int, default=1000, help="first N records train, the rest are held out")
    parser.add_argument("--methods", help="comma-separated subset of the profile's methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", type=config_key, default=None, metavar="KEY",
                        help="the entry of the results file this run writes (default: 'default', 'smoke' with "
                             "--smoke); the file's other entries are kept")
    parser.add_argument("--out", help="the results file (default benchmarks/results/quality_<device>.json)")
    parser.add_argument("--report", metavar="JSON", help="only summarise a results file (also a partial one): "
                        "each entry, or --config's only")
    parser.add_argument("--resume", metavar="JSON", help="reuse the runs of an earlier (stopped) results file's "
                        "entry (--config's) with the same settings instead of running them again")
    args = parser.parse_args(argv)
    if args.report:
        return report(Path(args.report), args.config)

    cfg = dict(PROFILES[args.profile], **(SMOKE if args.smoke else {}))
    if args.methods:
        keep = args.methods.split(",")
        cfg["swept"] = [m for m in cfg["swept"] if m in keep]
        cfg["inherited"] = [m for m in cfg["inherited"] if m in keep]
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = args.config or ("smoke" if args.smoke else "default")
    path = results_path("quality", device, args.out)
    t0 = time.perf_counter()

    import peft
    import transformers

    from loradafast.demo import load_smollm2

    base, tokenizer = load_smollm2()
    base = base.to(device)
    data = load_data(args, cfg, tokenizer, device)
    out = {
        "benchmark": "quality: fine-tune SmolLM2-135M from each LoRA initialisation (issue 15)",
        "date": time.strftime("%Y-%m-%d %H:%M"), "profile": args.profile, "smoke": args.smoke,
        "device": device_name(device), "threads": torch.get_num_threads(),
        "machine_note": "CPU shared with other jobs: timings are noisy" if device.type == "cpu" else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version(), "loradafast": loradafast.__version__},
        "model": base.config._name_or_path, "settings": cfg, "data": data["meta"],
        "protocol": __doc__.split("Protocol", 1)[1].split("Results:")[0].strip(),
        "lora": {"alpha": "2 * rank", "dropout": 0.0, "target_modules": "all-linear (decoder, not lm_head)",
                 "optimizer": "AdamW(weight_decay=0), betas (0.9, 0.999), clip 1.0"},
        "runs": [], "best_lr": {}, "init_timings": {},
    }
    ctx = {"cfg": cfg, "device": device, "base": base, "tokenizer": tokenizer, "out": out, "path": path, "key": key,
           "t0": t0,
           **{k: data[k] for k in ("init_batches", "heldout", "batches", "em_records")}}
    previous_base = None
    if args.resume:
        ctx["previous"], previous_base = resumable_runs(Path(args.resume), out, key)
    if previous_base is not None:  # the same model and data: its evaluation (20 min on CPU) is not redone
        out["base_model"] = previous_base
    else:
        out["base_model"] = {"heldout_nll": heldout_nll(base, data["heldout"])}
        if data["em_records"]:
            out["base_model"]["exact_match"] = exact_match(base, tokenizer, data["em_records"],
                                                           cfg["em_new_tokens"], device)
    print(f"[{time.perf_counter() - t0:7.0f}s] base model: {json.dumps(out['base_model'])[:300]}", flush=True)
    for rank in cfg["ranks"]:
        run_rank(ctx, rank)
    save(ctx)
    print(markdown_table(out["summary"], out["init_timings"]))
    print(plot(out, figure_path(path, key)))
    print(f"wrote entry {key!r} of {path}; wall {out['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
