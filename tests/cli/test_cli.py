"""The `loradafast` command, the data readers, the report, logging, progress totals and reprs, on a
tiny Llama saved with save_pretrained and a word-level tokenizer built offline."""
import io
import json
import logging
import subprocess
import sys

import pytest
import torch

import loradafast
from loradafast import cli, data, progress, report
from loradafast.cli import method_options
from tiny import padded_batches, random_sequences, tiny_llama

WORDS = "the a cat dog sat on mat ran to park what is two plus answer four question red blue sky".split()


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_model(directory):
    """A tiny Llama and its tokenizer in ``directory``, as save_pretrained writes them."""
    tiny_llama().save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(root / "model")
    records = [{"text": "the cat sat on the mat " * (1 + i % 3), "question": "what is two plus two",
                "answer": "four " * (1 + i % 2)} for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "train.txt").write_text("the dog ran to the park\n\nred sky blue sky\nthe cat sat\n")
    return {"root": root, "model": model, "jsonl": root / "train.jsonl", "txt": root / "train.txt"}


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def adapter_tensors(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


# ---- the command line --------------------------------------------------------------------------------

def test_python_m_help_explains_the_commands():
    out = subprocess.run([sys.executable, "-m", "loradafast", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for word in ("init", "collect", "solve", "report", "PeftModel.from_pretrained", "examples"):
        assert word in out.stdout


@pytest.mark.parametrize("command", ["init", "collect", "solve", "report"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(command, "--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: loradafast " + command in text and "(default: None)" not in text


def test_init_writes_an_adapter_peft_loads(files, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert run("init", "--model", files["model"], "--data", files["jsonl"], "--rank", 2, "--max-samples", 6,
               "--batch-size", 4, "--num-train-samples", 1000, "--out", out, "--no-progress",
               "--save-stats", tmp_path / "stats.safetensors") == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out)  # stdout: the path written; stderr: the log
    assert {"adapter_config.json", "adapter_model.safetensors", report.DIAGNOSTICS_FILE} <= {p.name for p in
                                                                                             out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["base_model_name_or_path"] == str(files["model"])
    saved = adapter_tensors(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["model"]), out)
    for key, value in model.state_dict().items():
        if "lora_B" in key:
            torch.testing.assert_close(value, saved[key.replace(".default", "")])
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # not PEFT's zero init
    logged = printed.err
    assert "collect: " in logged and "6 sequences" in logged and "solve: method=lora-da" in logged
    assert json.loads((out / "loradafast_init.json").read_text())["options"]["num_train_samples"] == 1000

    # solve from the saved statistics: the same adapter, without the model
    again = tmp_path / "again"
    assert run("solve", "--stats", tmp_path / "stats.safetensors", "--rank", 2, "--num-train-samples", 1000,
               "--out", again, "--no-progress") == 0
    for key, value in adapter_tensors(again).items():
        torch.testing.assert_close(value, saved[key])


def test_collect_then_solve_another_method_and_report(files, tmp_path):
    stats_file = tmp_path / "s.safetensors"
    assert run("collect", "--model", files["model"], "--data", files["txt"], "--out", stats_file, "-q") == 0
    stats = loradafast.Statistics.load(stats_file)
    assert stats.num_sequences == 3 and stats.meta["model_class"] == "LlamaForCausalLM"
    out = tmp_path / "ga"
    assert run("solve", "--stats", stats_file, "--rank", 2, "--method", "lora-ga", "--out", out, "--report",
               "--no-progress") == 0
    # lora-ga moves the base weight: by default the rank-2r adapter for the unmodified base
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "report" / report.TABLE_FILE).exists()
    assert run("report", out, "--out", tmp_path / "rep", "--no-plots") == 0
    assert "s_1" in (tmp_path / "rep" / report.TABLE_FILE).read_text().splitlines()[0]


def test_weight_only_method_needs_no_data(files, tmp_path):
    out = tmp_path / "pissa"
    assert run("init", "--model", files["model"], "--method", "pissa", "--rank", 2, "--residual-base", "--out", out,
               "-q") == 0
    assert json.loads((out / "loradafast_init.json").read_text())["base_weight"] == "residual"


@pytest.mark.parametrize("argv, message", [
    (["--text-field", "body"], "no field 'body'"),
    (["--prompt-field", "question"], "both --prompt-field and --answer-field"),
    (["--option", "beta"], "KEY=VALUE"),
    (["--option", "pissa_niter=2"], "is an option of pissa, not of method 'lora-da'"),
])
def test_mistakes_end_with_a_message_not_a_traceback(files, tmp_path, capsys, argv, message):
    assert run("init", "--model", files["model"], "--data", files["jsonl"], "--out", tmp_path / "x", "-q",
               *argv) == 1
    assert message in capsys.readouterr().err


def test_data_aware_method_without_data_says_so(files, tmp_path, capsys):
    assert run("init", "--model", files["model"], "--out", tmp_path / "x") == 1
    assert "--data" in capsys.readouterr().err


def test_parse_option():
    assert method_options.parse_option("beta=0.05") == ("beta", 0.05)
    assert method_options.parse_option("gamma=256") == ("gamma", 256)
    assert method_options.parse_option("damping_mode=relative") == ("damping_mode", "relative")
    assert method_options.parse_option("residual_tol=none") == ("residual_tol", None)


# ---- data --------------------------------------------------------------------------------------------

def test_prompt_answer_pairs_take_the_loss_on_the_answer_only(files):
    tok = build_tokenizer()
    samples = data.read_samples(files["jsonl"], data.Fields(prompt="question", answer="answer"))
    batches = data.tokenized_batches(samples, tok, batch_size=3, max_samples=5)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 2]
    prompt = len(tok("what is two plus two")["input_ids"])
    first = batches[0]
    assert (first["labels"][:, :prompt] == -100).all()
    assert (first["labels"][0, prompt:prompt + 2] == torch.tensor([tok.convert_tokens_to_ids("four"),
                                                                   tok.eos_token_id])).all()
    assert ((first["labels"] != -100) <= (first["attention_mask"] == 1)).all()


def test_plain_text_is_one_sample_per_line_and_max_length_cuts(files):
    samples = list(data.read_samples(files["txt"]))
    assert [s.text for s in samples] == ["the dog ran to the park", "red sky blue sky", "the cat sat"]
    batches = data.tokenized_batches(samples, build_tokenizer(), max_length=4)
    assert batches[0]["input_ids"].shape == (3, 4)


def test_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["the cat sat", "the dog ran"]})}) \
        .save_to_disk(str(tmp_path / "ds"))
    assert [s.text for s in data.read_samples(tmp_path / "ds", data.Fields(text="body"))] == ["the cat sat",
                                                                                              "the dog ran"]
    with pytest.raises(ValueError, match="splits"):
        list(data.read_samples(tmp_path / "ds", split="test"))


# ---- progress, logging, reprs --------------------------------------------------------------------------

def test_progress_totals_follow_the_loader():
    seqs = random_sequences(10)
    assert progress.pass_total(padded_batches(seqs, 4), 256) == 10
    assert progress.pass_total(padded_batches(seqs, 4), 6) == 6
    assert progress.pass_total(iter(padded_batches(seqs, 4)), 256) is None  # a generator: unknown
    ds = torch.utils.data.TensorDataset(torch.zeros(10, 3, dtype=torch.long))
    assert progress.pass_total(torch.utils.data.DataLoader(ds, batch_size=4), None) == 10
    assert progress.pass_total(torch.utils.data.DataLoader(ds, batch_size=4, drop_last=True), None) == 8


def test_progress_bar_ends_at_what_was_counted(monkeypatch):
    bars = []
    import tqdm.auto

    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        bars.append(real(*args, **kwargs, file=io.StringIO()))
        return bars[-1]

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    model = tiny_llama()
    loradafast.collect(model, padded_batches(random_sequences(5), 2), max_samples=64, progress=True)
    assert bars[0].total == 5 and bars[0].n == 5
    stats = loradafast.collect(model, iter(padded_batches(random_sequences(5), 2)), progress=True)
    assert bars[1].total is None and bars[1].n == 5
    loradafast.solve(stats, 2, progress=True)
    assert bars[2].total == len(stats.z_sums) and bars[2].n == len(stats.z_sums)  # the solve's bar, per group


def test_reprs_are_compact():
    stats = loradafast.collect(tiny_llama(), padded_batches(random_sequences(4), 2), progress=False)
    result = loradafast.solve(stats, 2)
    for obj in (stats, result, next(iter(result.layers.values())), next(iter(stats.layers.values()))):
        text = repr(obj)
        assert "tensor(" not in text and len(text) < 700, text
    assert "14 layers" in repr(stats) and "method='lora-da'" in repr(result)


def test_the_library_never_prints(capsys):
    stats = loradafast.collect(tiny_llama(), padded_batches(random_sequences(4), 2), progress=False)
    loradafast.solve(stats, 2)
    assert capsys.readouterr().out == ""


def test_every_public_class_has_a_docstring():
    import importlib
    import inspect
    import pkgutil

    missing = []
    for info in pkgutil.walk_packages(loradafast.__path__, "loradafast."):
        if "triton" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_"):
                doc = obj.__dict__.get("__doc__")
                if not doc or doc.startswith(name + "("):  # a dataclass's generated signature
                    missing.append(f"{info.name}.{name}")
    assert not missing


# ---- the report ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def solved():
    stats = loradafast.collect(tiny_llama(), padded_batches(random_sequences(6), 3), progress=False)
    return stats, loradafast.solve(stats, 2)


def test_report_with_plots(solved, tmp_path):
    pytest.importorskip("matplotlib")
    stats, result = solved
    path = result.report(tmp_path, stats=stats)
    for name in ("sigma.png", "residuals.png", "conditioning.png", "spectrum.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in path.read_text()
    rows = (tmp_path / report.TABLE_FILE).read_text().splitlines()
    assert len(rows) == 1 + len(result.layers) and "lambda_r+1" in rows[0] and "damping_raised" in rows[0]
    entry = report.load_diagnostics(tmp_path)["layers"]["model.layers.0.self_attn.q_proj"]
    # Ω's spectrum around the cut: its first r values are the kept eigenvalues
    torch.testing.assert_close(torch.tensor(entry["omega_spectrum"][:2]), torch.tensor(entry["eigenvalues"]),
                               rtol=1e-6, atol=1e-9 * abs(entry["omega_norm"]))
    assert len(entry["omega_spectrum"]) == 6


def test_report_without_matplotlib_still_writes_the_table(solved, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    _, result = solved
    with caplog.at_level(logging.WARNING, logger="loradafast"):
        path = result.report(tmp_path)
    assert "matplotlib is not installed" in path.read_text() and "loradafast[report]" in caplog.text
    assert not list(tmp_path.glob("*.png")) and (tmp_path / report.TABLE_FILE).exists()


def test_report_flags_raised_damping(solved, tmp_path):
    _, result = solved
    data = report.diagnostics(result)
    name = next(iter(data["layers"]))
    data["layers"][name]["damping_raised"] = True
    text = report.write_report(data, tmp_path, plots=False).read_text()
    assert f"damping raised: 1 ({name})" in text
