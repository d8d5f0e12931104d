"""Split-half stability of the LoRA A-subspace: how much do two disjoint samples of the same domain agree?

    python benchmarks/stability.py                        # SmolLM2-135M, 1k … 32k tokens per half (CPU: ~45 min)
    python benchmarks/stability.py --max-tokens 65536     # one more doubling (the pass time doubles)
    python benchmarks/stability.py --quick                # 2 sizes, 2 blocks: checks that it runs (~7 min)
    python benchmarks/stability.py --split chunks --max-tokens 16384   # control: both halves from every file
    python benchmarks/stability.py --tiny                 # a tiny random Llama, no SmolLM2 (seconds)
    python benchmarks/stability.py --plot results.json    # only redraw the figures of a results file

What it measures.  LoRA-DA's answer for a layer is an r-dimensional subspace of its inputs (the row
space of ``lora_A``).  Two disjoint halves of the same data (Python source of the standard library,
sequences of 128 tokens; half A from the even-numbered files, half B from the odd ones, as the demo
splits them) each give statistics (``loradafast.collect``) and a subspace; their overlap is the mean
squared cosine of the principal angles, ``‖Q_aᵀ Q_b‖²_F / r`` (1: the same subspace; r/in: what two
random subspaces share).  It is reported per layer, per module type and as the median over layers,
against the number of tokens per half (1k, 2k, … ``--max-tokens``; the smaller halves are prefixes of
the larger ones, and the statistics are accumulated, so each sequence runs through the model once).

Variants, solved on the same statistics (``VARIANTS``):

* through ``loradafast.solve``: LoRA-DA with its defaults (``y_factor="diag"``, absolute damping
  1e-6 as the official code), relative damping 1e-4 … 1e-1 (on Z and Y together), the full K-FAC Y,
  ``gradient="raw"``, ``beta=0``; LoRA-One and LoRA-GA as yardsticks;
* through a dense float64 reference built from the library's per-layer functions
  (``loradafast.methods.lora_da``: ``damped_z``, ``damped_factors``, ``omega_terms``; Ω materialised,
  ``eigh``), on the layers up to ``--ref-max-width`` inputs (576: all but down_proj), the options the
  library does not have: relative damping on Z only (Y at the absolute 1e-6; 1e-4 … 1e+1) and on Y
  only (Z at 1e-6; 1e-4 … 1e-1), Y replaced by its mean (isotropic, so Yλ⁻¹ does not weight the
  output channels), Z replaced by the mean of its diagonal times I (so Zλ⁻¹ does not weight the
  input directions), and two decompositions of the noise that are not split-half measures: both
  halves solved with one shared Z (both halves' sums; only G and Y differ) or one shared G (only Z
  and Y differ).  ``ref-da`` is the default through this path, a check against ``loradafast.solve``.

Per layer and variant it also records where the subspace lies: the share of A's span in the tenth of
Z's eigen-directions with the least input variance (``z_low``, random: ~0.1) and in Z's r top
eigen-directions (``z_top``, random: r/in), the input variance along A relative to the mean
(``z_energy``), the share of ``lora_B``'s energy on the tenth of the output channels with the smallest
Y (``y_low``), for LoRA-DA the variance term's smallest eigenvalue c/λ_max(Zλ) against the bias
term's scale α_b = 1 (``variance_over_bias_min``), and for the reference Ω's relative eigengap
(λ_{r+1} − λ_r)/‖Ω‖ (``relative_gap``).  Results: ``benchmarks/results/stability_cpu.json``, one entry
per configuration (``--config KEY``: default ``default``, ``split_chunks`` with ``--split chunks``;
the file's other entries are kept), written after every size, so a stopped run keeps what it
measured; the figure of entry ``default`` is ``stability_cpu.png``, of another
``stability_cpu_<KEY>.png``.  Findings:
``benchmarks/stability_findings.md``.

Cost: the pass is ~13 s per 1k tokens (both halves, 1 thread), ~4 min of solves per size for the 28
default layers; the default (1k … 32k tokens per half) took 44 min on the 2-core CPU, shared.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import statistics as st
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import loradafast  # noqa: E402
from loradafast.methods.lora_da import damped_factors, damped_z, omega_terms  # noqa: E402
from loradafast.statistics import Statistics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_key, environment, figure_path, pyplot, read_entries, results_path, write_entry  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_BLOCKS = (0, 10, 20, 29)
QUICK_BLOCKS = (0, 29)
ABSOLUTE = 1e-6  # the official code's damping, loradafast's default
RELATIVE = (1e-4, 1e-3, 1e-2, 1e-1)
STRONG = (1.0, 10.0)  # Z only: how much damping it takes (λ → ∞ is Z isotropic)

# name → how it is solved.  "solve": loradafast.solve(stats, method=..., **options) on the statistics
# with Y as "y" ("diag" or "full"); "ref": the dense float64 reference with separate Z / Y damping
# (mode, λ) and Z or Y replaced by an isotropic stand-in.
VARIANTS: dict[str, dict] = {
    "da": {"kind": "solve", "method": "lora-da", "options": {}, "y": "diag",
           "label": "LoRA-DA defaults (diag Y, absolute 1e-6)"},
    **{f"da-rel-{lam:.0e}": {"kind": "solve", "method": "lora-da", "y": "diag",
                             "options": {"damping": lam, "damping_mode": "relative"},
                             "label": f"LoRA-DA relative damping {lam:.0e} (Z and Y)"} for lam in RELATIVE},
    "da-yfull": {"kind": "solve", "method": "lora-da", "options": {}, "y": "full",
                 "label": "LoRA-DA full K-FAC Y (absolute 1e-6)"},
    "da-raw": {"kind": "solve", "method": "lora-da", "options": {"gradient": "raw"}, "y": "diag",
               "label": "LoRA-DA gradient='raw' (Δ = −G)"},
    "da-beta0": {"kind": "solve", "method": "lora-da", "options": {"beta": 0.0}, "y": "diag",
                 "label": "LoRA-DA beta=0 (no variance term)"},
    "lora-one": {"kind": "solve", "method": "lora-one", "options": {}, "y": "diag", "label": "LoRA-One (top-r of G)"},
    "lora-ga": {"kind": "solve", "method": "lora-ga", "options": {}, "y": "diag",
                "label": "LoRA-GA (top-r right vectors of G)"},
    "ref-da": {"kind": "ref", "z": ("absolute", ABSOLUTE), "y": ("absolute", ABSOLUTE),
               "label": "dense reference of the defaults (check)"},
    **{f"ref-zrel-{lam:.0e}": {"kind": "ref", "z": ("relative", lam), "y": ("absolute", ABSOLUTE),
                               "label": f"Z relative {lam:.0e}, Y absolute 1e-6"} for lam in RELATIVE + STRONG},
    **{f"ref-yrel-{lam:.0e}": {"kind": "ref", "z": ("absolute", ABSOLUTE), "y": ("relative", lam),
                               "label": f"Y relative {lam:.0e}, Z absolute 1e-6"} for lam in RELATIVE},
    "ref-yiso": {"kind": "ref", "z": ("absolute", ABSOLUTE), "y": ("absolute", ABSOLUTE), "y_iso": True,
                 "label": "Y → mean(Y)·1 (isotropic), Z absolute 1e-6"},
    "ref-ziso": {"kind": "ref", "z": ("absolute", ABSOLUTE), "y": ("absolute", ABSOLUTE), "z_iso": True,
                 "label": "Z → mean(diag Z)·I (isotropic), Y absolute 1e-6"},
    # Not split-half measures: both halves share one factor (both halves' sums), so what differs
    # between them is the other factor's sampling noise alone.
    "ref-zshared": {"kind": "ref", "z": ("absolute", ABSOLUTE), "y": ("absolute", ABSOLUTE), "shared": "Z",
                    "label": "defaults, Z of both halves shared (only G, Y differ)"},
    "ref-gshared": {"kind": "ref", "z": ("absolute", ABSOLUTE), "y": ("absolute", ABSOLUTE), "shared": "G",
                    "label": "defaults, G of both halves shared (only Z, Y differ)"},
}
BETA, NUM_TRAIN_SAMPLES = 0.03, 100_000  # LoRA-DA's defaults (LoraDAConfig), used by the reference


# -- model and data ------------------------------------------------------------------------------

def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def smollm2_layers(spec: str, num_blocks: int = 30) -> list[str]:
    """``spec``: "all", comma-separated block numbers (every module type of those blocks), or full
    layer names."""
    if spec == "all":
        blocks = range(num_blocks)
    elif all(part.strip().isdigit() for part in spec.split(",")):
        blocks = [int(part) for part in spec.split(",")]
    else:
        return [part.strip() for part in spec.split(",")]
    return [f"model.layers.{b}.{'self_attn' if m in MODULES[:4] else 'mlp'}.{m}" for b in blocks for m in MODULES]


def stdlib_halves(tokenizer, *, count: int, length: int, order: str,
                  split: str = "files") -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of ``count`` sequences of ``length`` tokens of standard-library source.

    ``split="files"``: half A from the even-numbered files, half B from the odd ones (the demo's
    split), so the halves share no file.  ``split="chunks"``: each file is cut into sequences, half A
    takes its even-numbered sequences and half B its odd ones, so both halves draw on every file.

    ``order="round-robin"``: a half takes the first sequence of every file, then the second of every
    file, ...: any prefix draws on as many files as it has sequences (up to the file count), so a
    small half is not one or two files.  ``order="demo"`` (with ``split="files"`` only):
    ``loradafast.demo.stdlib_chunks`` (files in order, each used up before the next)."""
    from loradafast.demo import stdlib_chunks

    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
    if order == "demo":
        if split != "files":
            raise SystemExit("--data-order demo needs --split files")
        return tuple(stdlib_chunks(tokenizer, count=count, length=length, files=part)
                     for part in (files[0::2], files[1::2]))
    per_file = []
    for path in files:
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        per_file.append([ids[i:i + length] for i in range(0, len(ids) - length + 1, length)])
    if split == "files":
        parts = [per_file[0::2], per_file[1::2]]
    else:
        parts = [[chunks[0::2] for chunks in per_file], [chunks[1::2] for chunks in per_file]]
    halves = []
    for part in parts:
        seqs = [chunks[k] for k in range(max(map(len, part))) for chunks in part if k < len(chunks)]
        if len(seqs) < count:
            raise SystemExit(f"only {len(seqs)} sequences of {length} tokens in half {len(halves)}; lower --max-tokens")
        halves.append(torch.tensor(seqs[:count]))
    return halves[0], halves[1]


def tiny_model_and_data(count: int, length: int):
    """A random 2-block Llama (hidden 64) and two halves of random token ids: seconds, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2 * count, length), generator=g)
    return model, ids[:count], ids[count:]


# -- statistics ----------------------------------------------------------------------------------

def add_statistics(total: Statistics | None, part: Statistics) -> Statistics:
    """The statistics of the union of two disjoint sets of sequences: sums and counts add (a new
    object holding only the totals: no split half of its own, so a solve does not re-solve halves)."""
    if total is None:
        return Statistics(dict(part.layers), dict(part.z_sums), part.num_tokens, part.num_sequences, part.y_factor,
                          dict(part.meta))
    layers = {n: dataclasses.replace(s, g_sum=s.g_sum + part.layers[n].g_sum, y_sum=s.y_sum + part.layers[n].y_sum)
              for n, s in total.layers.items()}
    z_sums = {k: v + part.z_sums[k] for k, v in total.z_sums.items()}
    return Statistics(layers, z_sums, total.num_tokens + part.num_tokens, total.num_sequences + part.num_sequences,
                      total.y_factor, dict(total.meta))


def diagonal_y(stats: Statistics) -> Statistics:
    """``y_factor="diag"`` statistics from ``"full"`` ones (the diagonal of the same sums)."""
    if stats.y_factor == "diag":
        return stats
    layers = {n: dataclasses.replace(s, y_sum=s.y_sum.diagonal().clone()) for n, s in stats.layers.items()}
    return Statistics(layers, stats.z_sums, stats.num_tokens, stats.num_sequences, "diag", dict(stats.meta))


def collect_more(model, ids: torch.Tensor, names: list[str], y_factor: str,
                 batch_size: int) -> tuple[Statistics, float]:
    batches = [{"input_ids": ids[i:i + batch_size]} for i in range(0, len(ids), batch_size)]
    t0 = time.perf_counter()
    # this study splits the data itself: no split half inside the statistics (where collect has the option)
    extra = {"split_halves": False} if "split_halves" in inspect.signature(loradafast.collect).parameters else {}
    stats = loradafast.collect(model, batches, target_modules=names, y_factor=y_factor, max_samples=None,
                               progress=False, **extra)
    return stats, time.perf_counter() - t0


# -- solves --------------------------------------------------------------------------------------

def solve_variant(spec: dict, stats: dict[str, Statistics], rank: int, cache: dict, *, eigensolver: str,
                  ref_layers: list[str]) -> dict[str, dict]:
    """name → {"A": [r, in], "B": [out, r], "c": variance coefficient or None, "damping_z": ...}."""
    if spec["kind"] == "solve":
        if spec["y"] not in stats:
            return {}
        options = dict(spec["options"])
        if spec["method"] == "lora-da":
            options["eigensolver"] = eigensolver
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degraded-solve and split-half summaries: the JSON has the figures
            result = loradafast.solve(stats[spec["y"]], rank=rank, method=spec["method"], **options)
        out = {}
        for name, layer in result.layers.items():
            d = layer.diagnostics
            out[name] = {"A": layer.lora_A.double(), "B": layer.lora_B.double(),
                         "c": getattr(d, "variance_coef", None), "damping_z": getattr(d, "damping_z", None),
                         "damping_y": getattr(d, "damping_y", None)}
        return out
    return {name: reference_layer(stats, name, spec, rank, cache) for name in ref_layers}


def reference_layer(halves: dict[str, Statistics], name: str, spec: dict, rank: int, cache: dict) -> dict:
    """LoRA-DA in float64 with separate Z and Y damping, through the library's per-layer functions
    (docs/design.md §4.1: Δ = −Yλ⁻¹GZλ⁻¹, Ω = β tr(Yλ⁻¹)/(Nσ²) Zλ⁻¹ − Δ̂ᵀΔ̂, the r smallest
    eigenvectors of the dense Ω).  ``halves``: this half's statistics ("diag") and both halves'
    together ("pooled"), which a variant may take Z or G from (``spec["shared"]``)."""
    stats = halves["diag"]
    group = stats.layers[name].input_group
    (z_mode, z_lam), (y_mode, y_lam) = spec["z"], spec["y"]
    shared = spec.get("shared")
    key = (group, z_mode, z_lam, bool(spec.get("z_iso")), shared == "Z")
    if key not in cache:
        Z = (halves["pooled"] if shared == "Z" else stats).Z(name)
        if spec.get("z_iso"):
            Z = Z.diagonal().mean() * torch.eye(Z.shape[0], dtype=Z.dtype)
        cache[key] = damped_z(Z, z_lam, z_mode)
    Y = stats.Y(name)
    if spec.get("y_iso"):
        Y = torch.full_like(Y, float(Y.mean()))
    factors = damped_factors(cache[key], Y, y_lam, y_mode)
    G = (halves["pooled"] if shared == "G" else stats).G(name)
    terms = omega_terms(G, factors, beta=BETA, num_train_samples=NUM_TRAIN_SAMPLES)
    evals, evecs = torch.linalg.eigh(terms.dense())
    a0 = evecs[:, :rank]
    gap = float((evals[rank] - evals[rank - 1]) / evals.abs().max())
    return {"A": a0.T, "B": terms.delta_hat @ a0, "c": float(terms.variance_coef), "damping_z": factors.damping_z,
            "damping_y": factors.damping_y, "gap": gap}


# -- measures ------------------------------------------------------------------------------------

def row_basis(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [in, r] of the row space of ``a`` [r, in]."""
    return torch.linalg.qr(a.double().T).Q


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of ``a`` and ``b``."""
    qa, qb = row_basis(a), row_basis(b)
    return float((qa.T @ qb).square().sum() / qa.shape[1])


def factor_info(stats: Statistics) -> tuple[dict, dict]:
    """Per input group: Z's eigenvalues and eigenvectors (float64); per layer: a summary of Z and Y."""
    eig = {}
    for name, s in stats.layers.items():
        if s.input_group not in eig:
            evals, evecs = torch.linalg.eigh(stats.Z(name))
            eig[s.input_group] = (evals, evecs)
    info = {}
    for name, s in stats.layers.items():
        evals = eig[s.input_group][0]
        y = stats.Y(name)
        y = y if y.dim() == 1 else y.diagonal()
        info[name] = {"z_eig_min": float(evals[0]), "z_eig_max": float(evals[-1]), "z_diag_mean": float(evals.mean()),
                      "z_frac_eig_below_1e-6": float((evals < ABSOLUTE).double().mean()),
                      "y_min": float(y.min()), "y_max": float(y.max()), "y_mean": float(y.mean()),
                      "y_median": float(y.median()), "y_frac_below_1e-6": float((y < ABSOLUTE).double().mean())}
    return eig, info


def placement(sol: dict, stats: Statistics, eig: tuple, damping_z: float | None) -> dict:
    """Where a layer's solution lies relative to the statistics of the half it came from."""
    evals, evecs = eig
    q = row_basis(sol["A"])
    n, r = q.shape
    proj = (evecs.T @ q).square()  # [n, r]: A's basis on Z's eigenvectors, ascending eigenvalues
    out = {"z_low": float(proj[: max(1, n // 10)].sum() / r), "z_top": float(proj[-r:].sum() / r),
           "z_energy": float((evals[:, None] * proj).sum() / r / evals.mean())}
    b = sol["B"]
    y = stats_y_diag(stats, sol["name"])
    idx = torch.argsort(y)[: max(1, len(y) // 10)]
    energy = b.square().sum(1)
    out["y_low"] = float(energy[idx].sum() / energy.sum().clamp_min(1e-300))
    if sol.get("c") is not None and damping_z is not None:
        out["variance_over_bias_min"] = float(sol["c"] / (evals[-1] + damping_z))  # c·λ_min(Zλ⁻¹) vs α_b = 1
    return out


def stats_y_diag(stats: Statistics, name: str) -> torch.Tensor:
    y = stats.Y(name)
    return y if y.dim() == 1 else y.diagonal()


def median(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return st.median(values) if values else None


def summarise(per_layer: dict[str, float], ref_layers: list[str]) -> dict:
    by_module: dict[str, list] = {}
    for name, v in per_layer.items():
        by_module.setdefault(module_type(name), []).append(v)
    return {"median": median(per_layer.values()), "mean": st.fmean(per_layer.values()) if per_layer else None,
            "median_ref_layers": median(per_layer.get(n) for n in ref_layers), "layers": len(per_layer),
            "by_module": {m: median(v) for m, v in by_module.items()}}


# -- the run -------------------------------------------------------------------------------------

def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    sizes = []
    tokens = args.min_tokens
    while tokens <= args.max_tokens:
        sizes.append(tokens)
        tokens *= 2
    counts = [max(1, t // args.length) for t in sizes]

    t0 = time.perf_counter()
    if args.tiny:
        model, ids_a, ids_b = tiny_model_and_data(counts[-1], args.length)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        model_name = "tiny random Llama (hidden 64, 2 blocks)"
        data = "random token ids"
    else:
        from loradafast.demo import load_smollm2

        model, tokenizer = load_smollm2()
        names = smollm2_layers(args.layers)
        ids_a, ids_b = stdlib_halves(tokenizer, count=counts[-1], length=args.length, order=args.data_order,
                                     split=args.split)
        model_name = model.config._name_or_path
        data = ("Python standard-library source, files > 20 kB sorted by name; " + (
            "half A the even-numbered files, half B the odd-numbered" if args.split == "files" else
            "half A the even-numbered sequences of every file, half B the odd-numbered") + f"; {args.data_order} order")
    widths = {n: m.in_features for n, m in model.named_modules() if n in names}
    ref_layers = [n for n in names if args.ref_max_width is None or widths[n] <= args.ref_max_width]
    print(f"{model_name}: {len(names)} layers ({len(ref_layers)} for the dense reference), halves of "
          f"{counts[-1]}×{args.length} tokens ready in {time.perf_counter() - t0:.1f}s; sizes (tokens per half) "
          f"{sizes}", flush=True)

    record = {
        "benchmark": "stability",
        "environment": environment("cpu"),
        "settings": {"model": model_name, "data": data, "rank": args.rank, "sequence_length": args.length,
                     "batch_size": args.batch_size, "y_collected": args.y_collect, "layers": names,
                     "sizes_tokens_per_half": sizes, "reference_beta": BETA,
                     "reference_num_train_samples": NUM_TRAIN_SAMPLES, "reference_layers": ref_layers,
                     "lora_da_eigensolver": args.eigensolver, "threads": torch.get_num_threads(),
                     "data_order": args.data_order, "split": args.split},
        "variants": {v: {k: val for k, val in VARIANTS[v].items() if k != "kind"} | {"kind": VARIANTS[v]["kind"]}
                     for v in variants},
        "random_baseline": {},
        "sizes": [],
    }
    totals: list[Statistics | None] = [None, None]
    done = 0
    for tokens, count in zip(sizes, counts):
        pass_s = 0.0
        for h, ids in enumerate((ids_a, ids_b)):
            part, seconds = collect_more(model, ids[done:count], names, args.y_collect, args.batch_size)
            totals[h] = add_statistics(totals[h], part)
            pass_s += seconds
        print(f"[{tokens} tokens per half] pass {pass_s:.1f}s for 2×{count - done} new sequences", flush=True)
        done = count
        pooled = diagonal_y(add_statistics(totals[0], totals[1]))
        halves = [{"diag": diagonal_y(t), "pooled": pooled} | ({"full": t} if t.y_factor == "full" else {})
                  for t in totals]
        entry = {"tokens_per_half": tokens, "sequences_per_half": count,
                 "tokens_counted": [t.num_tokens for t in totals], "pass_s": pass_s, "solve_s": {}, "variants": {}}

        eigs, infos = zip(*(factor_info(h["diag"]) for h in halves))
        entry["factors_half_a"] = infos[0]
        for v in variants:
            spec = VARIANTS[v]
            t1 = time.perf_counter()
            caches = [{}, {}]
            sols = [solve_variant(spec, halves[h], args.rank, caches[h], eigensolver=args.eigensolver,
                                  ref_layers=ref_layers) for h in range(2)]
            entry["solve_s"][v] = time.perf_counter() - t1
            if not sols[0]:
                continue
            per_layer, where = {}, {}
            for name in sols[0]:
                per_layer[name] = overlap(sols[0][name]["A"], sols[1][name]["A"])
                group = halves[0]["diag"].layers[name].input_group
                places = [placement(dict(sols[h][name], name=name), halves[h]["diag"], eigs[h][group],
                                    sols[h][name].get("damping_z")) for h in range(2)]
                where[name] = {k: st.fmean(p[k] for p in places) for k in places[0]}
                if "gap" in sols[0][name]:
                    where[name]["relative_gap"] = st.fmean(s[name]["gap"] for s in sols)
                record["random_baseline"][name] = args.rank / sols[0][name]["A"].shape[1]
            summary = summarise(per_layer, ref_layers)
            for key in next(iter(where.values())):
                summary[f"median_{key}"] = median(w.get(key) for w in where.values())
            entry["variants"][v] = summary | {"per_layer": per_layer, "per_layer_placement": where}
            if v == "da":
                entry["_da"] = [{n: s["A"] for n, s in sol.items()} for sol in sols]
            if v == "ref-da" and "_da" in entry:  # the reference against the library, on the same half
                entry["check_ref_vs_solve"] = {
                    "min_overlap": min(overlap(entry["_da"][h][n], sols[h][n]["A"]) for h in range(2) for n in sols[h])}
            modules = ", ".join(f"{m.replace('_proj', '')} {x:.2f}" for m, x in summary["by_module"].items())
            print(f"  {v:16s} median overlap {summary['median']:.3f} ({summary['layers']} layers; "
                  f"{summary['median_ref_layers']:.3f} on the reference's)  ({modules})  {entry['solve_s'][v]:.1f}s",
                  flush=True)
        entry.pop("_da", None)
        record["sizes"].append(entry)
        record["wall_s"] = time.perf_counter() - t0
        write_entry(record, args.out_path, args.config, benchmark="stability", device="cpu", quiet=True)
        plot(record, figure_path(args.out_path, args.config))
    print(f"wrote entry {args.config!r} of {args.out_path} and {figure_path(args.out_path, args.config)} "
          f"({time.perf_counter() - t0:.0f}s)")
    return record


# -- the figure ----------------------------------------------------------------------------------

def line_style(plt, variant: str) -> dict:
    """One colour family per sweep (darker: more damping), fixed colours for the rest."""
    fixed = {"da": ("black", "-"), "ref-da": ("black", ":"), "da-yfull": ("tab:purple", "-"),
             "da-beta0": ("tab:brown", ":"), "da-raw": ("tab:red", "--"), "lora-one": ("tab:gray", "--"),
             "lora-ga": ("silver", ":"), "ref-yiso": ("tab:orange", "-."), "ref-ziso": ("tab:blue", "-."),
             "ref-zshared": ("tab:cyan", "--"), "ref-gshared": ("tab:pink", "--")}
    if variant in fixed:
        color, ls = fixed[variant]
        return {"color": color, "ls": ls}
    for prefix, cmap in (("da-rel-", "Greens"), ("ref-zrel-", "Blues"), ("ref-yrel-", "Oranges")):
        if variant.startswith(prefix):
            shade = (math.log10(float(variant[len(prefix):])) + 5) / 7  # 1e-4 … 1e+1 → 0.14 … 0.86
            return {"color": plt.get_cmap(cmap)(0.3 + 0.7 * min(max(shade, 0.0), 1.0)), "ls": "-"}
    return {}


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None or not record["sizes"]:
        return
    tokens = [s["tokens_per_half"] for s in record["sizes"]]
    variants = list(record["variants"])

    def series(v, key=None, field="median"):
        out = []
        for s in record["sizes"]:
            x = s["variants"].get(v)
            out.append(None if x is None else (x[field] if key is None else x["by_module"].get(key)))
        return out

    ref = [v for v in variants if VARIANTS.get(v, {}).get("kind") == "ref"]
    panels = [("loradafast.solve, all layers", [v for v in variants if VARIANTS.get(v, {}).get("kind") == "solve"],
               "median"),
              (f"dense reference ({len(record['settings'].get('reference_layers', []))} layers): Z and Y damped "
               "separately, or isotropic", ref + [v for v in ("da", "lora-one") if v in variants and ref],
               "median_ref_layers")]
    fig, axes = plt.subplots(1, 3, figsize=(19, 8.5))
    chance_levels = sorted(set(record["random_baseline"].values()))
    for ax, (title, chosen, field) in zip(axes, panels):
        for v in chosen:
            ys = series(v, field=field)
            if all(y is None for y in ys):
                continue
            ax.plot(tokens, ys, marker="o", ms=3, label=f"{v}: {record['variants'][v]['label']}", **line_style(plt, v))
        for b in chance_levels:
            ax.axhline(b, color="gray", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
    da = "da" if "da" in variants else variants[0]
    for m in MODULES + tuple(sorted({module_type(n) for n in record["settings"]["layers"]} - set(MODULES))):
        ys = series(da, m)
        if any(y is not None for y in ys):
            axes[2].plot(tokens, ys, marker="o", ms=3, label=m)
    for b in chance_levels:
        axes[2].axhline(b, color="gray", ls=":", lw=1)
    axes[2].set_title(f"{da} by module type (median over blocks)", fontsize=10)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # random subspaces share ~1 %: the low end matters
        ax.set_ylim(3e-3, 1.05)
        ax.set_xlabel("tokens per half")
        ax.set_ylabel("split-half overlap ‖QaᵀQb‖²/r (median over layers)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
        ax.grid(alpha=0.3)
    s = record["settings"]
    fig.suptitle(f"{s['model']}, rank {s['rank']}, {len(s['layers'])} layers; dotted: random subspaces (r/in)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32768, help="tokens per half at the largest size")
    parser.add_argument("--min-tokens", type=int, default=1024, help="tokens per half at the smallest size")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", default=",".join(map(str, DEFAULT_BLOCKS)),
                        help="block numbers (every module type of those blocks), 'all', or full layer names")
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--y-collect", choices=("full", "diag"), default="full",
                        help="full: also solve with the full Y (the diagonal variants read its diagonal)")
    parser.add_argument("--data-order", choices=("round-robin", "demo"), default="round-robin")
    parser.add_argument("--split", choices=("files", "chunks"), default="files",
                        help="halves from disjoint files, or disjoint sequences of the same files")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on 2 shared cores, 2 threads made a 576-wide eigh 20× slower)")
    parser.add_argument("--eigensolver", choices=("auto", "lobpcg", "dense"), default="auto",
                        help="LoRA-DA's eigensolver in the loradafast.solve variants (the subspace is the same)")
    parser.add_argument("--ref-max-width", type=int, default=576,
                        help="the dense reference solves the layers up to this input width (0: all)")
    parser.add_argument("--config", type=config_key, metavar="KEY",
                        help="the entry of the results file this run writes (default: 'default', 'split_chunks' "
                             "with --split chunks); the file's other entries are kept")
    parser.add_argument("--out", help="the results file (default benchmarks/results/stability_cpu.json)")
    parser.add_argument("--quick", action="store_true", help="2 sizes (1k, 2k tokens per half), blocks 0 and 29")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (seconds)")
    parser.add_argument("--plot", metavar="JSON",
                        help="only redraw the figures of a results file (each entry's, or --config's only)")
    args = parser.parse_args(argv)
    args.ref_max_width = args.ref_max_width or None
    if args.plot:
        path = Path(args.plot)
        entries = read_entries(path) or {"default": json.loads(path.read_text())}  # or a record of the former layout
        for key, record in entries.items():
            if args.config in (None, key):
                plot(record, figure_path(path, key))
        return
    args.config = args.config or ("split_chunks" if args.split == "chunks" else "default")
    if args.tiny:
        args.length, args.min_tokens, args.max_tokens, args.batch_size = 16, 256, 512, 8
    elif args.quick:
        args.min_tokens, args.max_tokens, args.layers = 1024, 2048, ",".join(map(str, QUICK_BLOCKS))
    if args.out:
        args.out_path = results_path("stability", "cpu", args.out)
    elif args.tiny or args.quick:  # smoke runs stay out of benchmarks/results
        args.out_path = Path(tempfile.gettempdir()) / f"stability_{'tiny' if args.tiny else 'quick'}.json"
    else:
        args.out_path = results_path("stability", "cpu")
    run(args)


if __name__ == "__main__":
    main()
