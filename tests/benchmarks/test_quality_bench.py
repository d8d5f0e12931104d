"""The helpers of benchmarks/quality.py (at most a tiny random model: seconds)."""
import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
q = importlib.util.module_from_spec(spec)
spec.loader.exec_module(q)


def test_final_number_gsm8k_and_free_text():
    assert q.final_number("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18") == "18"
    assert q.final_number("so the total is $1,234.") == "1234"
    assert q.final_number("#### 2.50") == "2.5"
    assert q.final_number("half is 0.5 and 3.0 more\nQuestion: 7 apples") == "3"
    assert q.final_number("no digits here") is None
    assert q.final_number("#### -4") == "-4"


def test_read_records_jsonl_and_text(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"text": "plain"}\n')
    recs = q.read_records(j)
    assert recs[0] == {"prompt": "Question: 1+1?\nAnswer:", "answer": " #### 2"}
    assert recs[1] == {"prompt": "", "answer": "plain"}
    t = tmp_path / "d.txt"
    t.write_text("a" * 30 + "\n\n" + "b" * 30 + "\n\n" + "c")
    chunks = q.read_records(t, text_chunk_chars=50)
    assert [len(c["answer"]) for c in chunks] == [62, 1]


def test_split_keeps_a_heldout_part():
    assert q.split_records(1319, 1000) == (range(0, 1000), range(1000, 1319))
    assert q.split_records(100, 1000) == (range(0, 80), range(80, 100))


def test_lr_schedule_warmup_then_cosine_to_zero():
    m = [q.lr_schedule(s, 20, 0.1) for s in range(21)]
    assert m[0] == 0.5 and m[1] == 1.0
    assert all(a >= b for a, b in zip(m[1:], m[2:]))
    assert m[20] == pytest.approx(0.0, abs=1e-12)


def test_tail_loss_and_divergence():
    assert q.tail_loss([4.0, 3.0, 2.0, 1.0]) == 1.0
    assert q.tail_loss([4.0, 3.0, 2.0, 1.0, 1.0, 3.0, 3.0, 1.0]) == 2.0
    assert q.tail_loss([1.0, math.inf]) == math.inf


def test_best_lr_extends_past_an_edge():
    assert q.best_lr({1e-4: 2.0, 3e-4: 1.5, 1e-3: 1.8}) == (3e-4, None)
    lr, nxt = q.best_lr({3e-4: 1.0, 1e-3: 1.5, 3e-3: 2.0})
    assert lr == 3e-4 and nxt == pytest.approx(9e-5)
    lr, nxt = q.best_lr({3e-4: 2.0, 1e-3: 1.5, 3e-3: 1.0})
    assert lr == 3e-3 and nxt == pytest.approx(9e-3)
    assert q.best_lr({1e-3: math.inf, 3e-3: math.inf}) == (1e-3, None)


def test_paired_test():
    r = q.paired_test([1.0, 2.0, 3.0], [0.9, 1.9, 2.9])
    assert r["mean_diff"] == pytest.approx(0.1) and r["exceeds_noise"] is True
    r = q.paired_test([1.0, 2.0, 3.0], [0.8, 2.1, 2.9])
    assert r["exceeds_noise"] is False
    assert q.paired_test([1.0], [2.0])["exceeds_noise"] is None


def test_every_profile_method_is_known():
    for cfg in (*q.PROFILES.values(), q.SMOKE):
        for name in cfg["swept"] + cfg["inherited"]:
            assert name in q.METHODS
            parent = q.METHODS[name].get("parent")
            assert parent is None or parent in q.METHODS


def test_peft_lora_ga_gets_the_all_linear_layers_by_name():
    """PEFT's preprocess_loraga does not expand "all-linear" (it found no layer in the first CPU
    run); the benchmark names the same layers: every Linear but the output embedding."""
    import torch
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    names = q.all_linear_names(model)
    assert len(names) == 14 and "lm_head" not in names
    config = q.lora_config(2, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), target_modules=names)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    preprocess_loraga(model, config, lambda: model(input_ids=ids, labels=ids).loss.backward())
    assert all(hasattr(model.get_submodule(n), "_peft_loraga_grad") for n in names)
