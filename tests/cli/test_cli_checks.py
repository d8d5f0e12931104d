"""`loradafast init` checks its arguments before the statistics pass, says what to do, and leaves
the user's files as they were; what people pass to PEFT and TRL reaches the adapter.  A tiny
Llama saved with save_pretrained and a word-level tokenizer built offline; no network."""
import json

import pytest

import loradafast
from loradafast import cli, data, passes
from loradafast.cli import loading, method_options
from loradafast.methods.registry import known_keywords
from loradafast.options import option_help
from test_cli import adapter_tensors, build_tokenizer, save_tiny_model

# The role words are in the tokenizer's vocabulary, so a rendered chat shows that the template ran.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}question {% else %}answer {% endif %}"
                 "{{ m['content'] }} {% endfor %}")
LINEAR_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    model = save_tiny_model(root / "model")
    chat_tokenizer = build_tokenizer()
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    chat_tokenizer.save_pretrained(root / "chat-tokenizer")
    texts = [{"text": "the cat sat on the mat " * (1 + i % 3)} for i in range(6)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    chats = [{"messages": [{"role": "user", "content": "what is two plus two"},
                           {"role": "assistant", "content": "four " * (1 + i % 2)}]} for i in range(4)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return {"model": model, "jsonl": root / "train.jsonl", "chat": root / "chat.jsonl",
            "chat_tokenizer": root / "chat-tokenizer"}


@pytest.fixture
def forwards(monkeypatch):
    """One entry per forward of any model the CLI loads: a pre-hook on its input embedding, which
    every forward calls (PEFT's wrapper calls the model's forward() directly, past a hook on the model)."""
    calls = []
    real = loading.load_model

    def counting(args):
        model, tokenizer = real(args)
        model.get_input_embeddings().register_forward_pre_hook(lambda module, inputs: calls.append(1))
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model", counting)
    return calls


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def init(files, out, *argv) -> int:
    return run("init", "--model", files["model"], "--data", files["jsonl"], "--out", out, "-q", "--max-samples", 4,
               "--no-split-halves", *argv)


def error_text(err: str) -> str:
    """The CLI's own error (the last thing on stderr), with no traceback."""
    head, sep, text = err.partition("loradafast init: error:")
    assert sep and "Traceback" not in err and "loradafast init: error:" not in text, err
    return text.strip()


def error_line(err: str) -> str:
    """The CLI's own error, which must be one line."""
    text = error_text(err)
    assert "\n" not in text, text
    return text


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- bad arguments: a message that says what to do, no forward, nothing written ------------------------

@pytest.mark.parametrize("argv, messages", [
    (["--rank", 13], ["rank 13 exceeds min(in, out) = 12", "--rank 12 or less"]),
    (["--method", "lora-ga", "--rank", 7], ["LoRA-GA uses 2r = 14", "--rank 6 or less"]),
    (["--rank", 13, "--save-stats", "{tmp}/s.safetensors"], ["rank 13 exceeds"]),  # the pass would come first
    (["--rank", 4, "--rank-pattern", "k_proj=13"], ["rank 13 exceeds", "k_proj", "--rank-pattern"]),
    (["--option", "betaa=0.1"], ["--option betaa", "not an option of method 'lora-da'", "did you mean 'beta'",
                                 "beta=0.03", "weight of the variance term", "damping_mode=absolute"]),
    (["--method", "lora-ga", "--option", "beta=0.1"], ["is an option of lora-da, not of method 'lora-ga'",
                                                         "loraga_variant=paper"]),
    (["--method", "lora-ga", "--num-train-samples", 100], ["--num-train-samples", "is an option of lora-da"]),
    (["--option", "beta=-1"], ["--option beta", "beta must be ≥ 0"]),
    (["--option", "eigensolver=fast"], ["eigensolver must be one of"]),
    (["--option", "dtype=float16"], ["float64 or float32"]),
    (["--rank-pattern", "kproj=4"], ["--rank-pattern: 'kproj' selects no target layer", "did you mean 'k_proj'"]),
    (["--alpha-pattern", "lm_head=4"], ["--alpha-pattern: 'lm_head' selects no target layer"]),
    (["--target-modules", "q_proj,vproj"], ["'vproj' names no linear layer", "did you mean 'v_proj'"]),
    (["--target-regex", "q_proj"], ["matches no linear layer", "whole path"]),
    (["--save-stats", "{tmp}/s.safetensors", "--memory-budget", "1GB"], ["give only one of them"]),
    (["--method", "pissa", "--save-stats", "{tmp}/s.safetensors"], ["runs no statistics pass"]),
    (["--save-stats", "{jsonl}/s.safetensors"], ["is a file, not a directory"]),
    (["--save-stats", "{tmp}"], ["is a directory; give a file path"]),
    (["--data", "{chat}"], ["chat template", "--tokenizer"]),
    (["--data", "{tmp}/train.jsonl"], ["train.jsonl: no such file or directory"]),
])
def test_bad_arguments_fail_before_any_forward(files, tmp_path, capsys, forwards, argv, messages):
    argv = [str(a).format(tmp=tmp_path, jsonl=files["jsonl"], chat=files["chat"]) for a in argv]
    out = tmp_path / "adapter"
    assert init(files, out, *argv) == 1
    text = error_text(capsys.readouterr().err)
    for message in messages:
        assert message in text
    assert forwards == [], "the pass ran before the arguments were checked"
    assert [p.name for p in tmp_path.iterdir()] == []  # no adapter, no statistics, no leftovers


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", 0], "argument --batch-size: must be 1 or more, got 0"),
    (["--batch-size", -1], "argument --batch-size: must be 1 or more, got -1"),
    (["--max-samples", 0], "argument --max-samples: must be 1 or more, got 0"),
    (["--max-length", 0], "argument --max-length: must be 1 or more, got 0"),
    (["--rank", "eight"], "argument --rank: expected a whole number of 1 or more"),
    (["--num-train-samples", 0], "argument --num-train-samples: must be 1 or more"),
    (["--memory-budget", "lots"], "argument --memory-budget: memory_budget 'lots' is not a size"),
    (["--lora-dropout", 1], "argument --lora-dropout: must be at least 0 and less than 1"),
    (["--lora-alpha", 0], "argument --lora-alpha: must be a finite number greater than 0"),
    (["--rank-pattern", "q_proj"], "expected KEY=VALUE"),
    (["--rank-pattern", "q_proj=0"], "ranks must be 1 or more"),
    (["--rank-pattern", '{"q_proj": 4'], "not valid JSON"),
    (["--alpha-pattern", "q_proj=x"], "alphas expected a number"),
    (["--target-regex", "(q_proj"], "is not a regular expression"),
])
def test_bad_values_are_refused_by_the_parser(files, tmp_path, capsys, forwards, argv, message):
    with pytest.raises(SystemExit) as exit_:
        init(files, tmp_path / "adapter", *argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert forwards == [] and not (tmp_path / "adapter").exists()


def test_the_forward_counter_sees_the_pass(files, tmp_path, forwards):
    assert init(files, tmp_path / "adapter", "--rank", 2) == 0
    assert len(forwards) >= 1  # so the zero counts above mean something


def test_every_method_option_has_help():
    # Each field of every options class carries its help (options.option), so the CLI can print it.
    documented = {key for record in loradafast.REGISTRY.values() for key in option_help(record.config)}
    assert documented == set(known_keywords()) - {"solve_dtype"}
    for record in loradafast.REGISTRY.values():
        assert all(text for _, text in option_help(record.config).values()), record.name
    for method in loradafast.METHODS:
        listing = method_options.options_help(loradafast.REGISTRY[method])
        assert all(len(line.split(None, 1)) == 2 for line in listing.splitlines()), listing


# ---- the output directory ------------------------------------------------------------------------------

def test_existing_out_is_refused_and_overwrite_leaves_no_stale_report(files, tmp_path, capsys):
    out = tmp_path / "adapter"
    weights_only = ["--method", "lora", "--option", "seed=0"]
    assert init(files, out, *weights_only, "--rank", 2, "--report") == 0
    before = snapshot(out)
    assert "report/layers.csv" in before

    assert init(files, out, *weights_only, "--rank", 3) == 1
    assert "--overwrite" in error_line(capsys.readouterr().err)
    assert snapshot(out) == before

    assert init(files, out, *weights_only, "--rank", 3, "--overwrite") == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert not (out / "report").exists()  # it described the rank-2 adapter

    assert init(files, out, *weights_only, "--rank", 4, "--overwrite", "--report") == 0
    layers = json.loads((out / "report" / "loradafast_diagnostics.json").read_text())["layers"]
    assert {entry["rank"] for entry in layers.values()} == {4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directory left


def test_a_failed_write_leaves_the_old_adapter(files, tmp_path, capsys, monkeypatch):
    import loradafast.report

    out = tmp_path / "adapter"
    assert init(files, out, "--method", "lora", "--rank", 2, "--report") == 0
    before = snapshot(out)

    def broken(result, directory, **kwargs):
        directory.mkdir(parents=True)
        (directory / "layers.csv").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loradafast.report, "write_report", broken)
    assert init(files, out, "--method", "lora", "--rank", 3, "--overwrite", "--report") == 1
    assert "disk full" in error_line(capsys.readouterr().err)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_stats_into_a_missing_directory_and_only_what_the_method_reads(files, tmp_path, monkeypatch):
    collected = []
    real = passes.collect
    monkeypatch.setattr(passes, "collect", lambda *a, **k: (collected.append(k["factors"]), real(*a, **k))[1])
    assert init(files, tmp_path / "ga", "--method", "lora-ga", "--rank", 2) == 0
    assert collected == [frozenset("G")]  # not Y and Z, which LoRA-GA never reads

    stats_file = tmp_path / "new" / "dir" / "stats.safetensors"
    assert init(files, tmp_path / "ga2", "--method", "lora-ga", "--rank", 2, "--save-stats", stats_file) == 0
    assert loradafast.Statistics.load(stats_file).factors == frozenset("G")
    assert init(files, tmp_path / "ga3", "--method", "lora-ga", "--rank", 2, "--save-stats", stats_file) == 1
    assert not (tmp_path / "ga3").exists()  # an existing statistics file needs --overwrite, like --out


def test_memory_budget_reaches_the_planner(files, tmp_path, capsys, monkeypatch):
    from loradafast import passes

    budgets = []
    real = passes.plan_for

    def spy(pipeline, loader):  # the planner's stage, as the pipeline of `init` calls it
        budgets.append(pipeline.run_options.memory_budget)
        return real(pipeline, loader)

    monkeypatch.setattr(passes, "plan_for", spy)
    assert init(files, tmp_path / "a", "--rank", 2, "--memory-budget", "40GB") == 0
    assert budgets == ["40GB"]
    assert init(files, tmp_path / "b", "--rank", 2, "--memory-budget", "1KB") == 1
    assert "the memory budget is 1.00 KB" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "b").exists()


# ---- what people pass to PEFT ------------------------------------------------------------------------

def test_peft_options_reach_the_adapter(files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert init(files, out, "--method", "lora", "--rank", 4, "--lora-alpha", 16, "--use-rslora", "--lora-dropout",
                0.05, "--target-regex", r".*\.(q_proj|k_proj|v_proj)", "--rank-pattern", "k_proj=2",
                "--rank-pattern", '{"layers\\\\.1\\\\.self_attn\\\\.v_proj": 3}', "--alpha-pattern", "v_proj=32") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["lora_dropout"]) == (4, 16, True, 0.05)
    assert config["target_modules"] == r".*\.(q_proj|k_proj|v_proj)"
    assert config["rank_pattern"] == {"k_proj": 2, r"layers\.1\.self_attn\.v_proj": 3}
    assert config["alpha_pattern"] == {"v_proj": 32}
    ranks = {key.removeprefix("base_model.model.model.").removesuffix(".lora_A.weight"): value.shape[0]
             for key, value in adapter_tensors(out).items() if "lora_A" in key}
    assert ranks == {"layers.0.self_attn.q_proj": 4, "layers.0.self_attn.k_proj": 2, "layers.0.self_attn.v_proj": 4,
                     "layers.1.self_attn.q_proj": 4, "layers.1.self_attn.k_proj": 2, "layers.1.self_attn.v_proj": 3}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["model"]), out)
    v_proj = model.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
    assert v_proj.scaling["default"] == pytest.approx(32 / 3 ** 0.5)  # rsLoRA: alpha/√r
    assert v_proj.lora_dropout["default"].p == 0.05


def test_default_targets_are_every_linear_layer_by_leaf_name(files, tmp_path):
    out = tmp_path / "adapter"
    assert init(files, out, "--method", "lora", "--rank", 2) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == LINEAR_LEAVES
    assert (config["lora_dropout"], config["use_rslora"], config["lora_alpha"]) == (0.0, False, 8)
    assert config["task_type"] == "CAUSAL_LM"


# ---- what people pass to TRL: chats ----------------------------------------------------------------

def test_chat_records_are_rendered_with_the_chat_template(files):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files["chat_tokenizer"])
    samples = list(data.read_samples(files["chat"]))
    assert samples[0].messages[1] == {"role": "assistant", "content": "four "}
    batches = data.tokenized_batches(samples, tokenizer, batch_size=4)
    rendered = tokenizer.apply_chat_template(samples[0].messages, tokenize=False)
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert batches[0]["input_ids"][0, :len(expected)].tolist() == expected
    assert tokenizer.convert_tokens_to_ids("question") in expected  # the template's words, not the raw JSON
    with pytest.raises(ValueError, match="chat template"):
        data.tokenized_batches(samples, build_tokenizer())
    with pytest.raises(ValueError, match="'role' and 'content'"):
        data.Fields().sample({"messages": [{"text": "hi"}]}, "row 0")


def test_init_on_chat_data(files, tmp_path, forwards):
    out = tmp_path / "adapter"
    assert init(files, out, "--data", files["chat"], "--tokenizer", files["chat_tokenizer"], "--rank", 2) == 0
    assert len(forwards) >= 1 and (out / "adapter_model.safetensors").exists()


# ---- the Hub, where the network allows ------------------------------------------------------------------

def test_hub_dataset_names(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "the cat sat"}, {"text": "the dog ran"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    samples = data.read_samples("someone/corpus", split="test", config="main")
    assert [s.text for s in samples] == ["the cat sat", "the dog ran"]
    assert calls == [("someone/corpus", "main", "test", True)]  # streamed: only the rows read are fetched
    for path in ("train.jsonl", "./corpus", "/data/corpus", "data/train.txt"):
        assert not data.is_hub_dataset_name(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(data.read_samples("missing.jsonl"))


def test_hub_dataset_out_of_reach_is_one_line(files, tmp_path, capsys, monkeypatch, forwards):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert init(files, tmp_path / "adapter", "--data", "someone/corpus") == 1
    line = error_line(capsys.readouterr().err)
    assert "reading it as a Hugging Face dataset failed: Couldn't reach 'someone/corpus'" in line
    assert "more detail" not in line and forwards == []


def test_model_ids_and_trust_remote_code(files, tmp_path, capsys, monkeypatch):
    import transformers

    calls = []

    def from_pretrained(source, **kwargs):
        calls.append((source, kwargs.get("trust_remote_code")))
        if source == "someone/custom":
            raise ValueError("someone/custom contains custom code which must be executed to correctly load the "
                             "model. Please pass the argument `trust_remote_code=True` to allow custom code to be run.")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    assert run("init", "--model", "someone/model", "--method", "lora", "--out", tmp_path / "a", "-q") == 1
    line = error_line(capsys.readouterr().err)
    assert "--model someone/model is not a local directory, and loading it from the Hugging Face Hub failed: " \
           "We couldn't connect" in line and "HF_HUB_OFFLINE=1" in line
    assert run("init", "--model", "someone/custom", "--method", "lora", "--out", tmp_path / "a", "-q",
               "--trust-remote-code") == 1
    assert "pass --trust-remote-code" in error_line(capsys.readouterr().err)
    assert calls == [("someone/model", False), ("someone/custom", True)]  # off unless asked for
    assert run("init", "--model", "./no-such-model", "--method", "lora", "--out", tmp_path / "a", "-q") == 1
    assert "not a directory" in error_line(capsys.readouterr().err) and len(calls) == 2  # a path: no Hub lookup
    assert not (tmp_path / "a").exists()


def test_solve_takes_the_patterns_and_rslora(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tiny import padded_batches, random_sequences

    stats_file = tmp_path / "stats.safetensors"
    model = AutoModelForCausalLM.from_pretrained(files["model"])
    loradafast.collect(model, padded_batches(random_sequences(4, vocab=24), 2), progress=False,
                       split_halves=False).save(stats_file)
    out = tmp_path / "adapter"
    argv = ["solve", "--stats", stats_file, "--method", "lora-one", "--rank", 4, "--lora-alpha", 16, "--use-rslora",
            "--out", out, "-q"]
    assert run(*argv, "--rank-pattern", "kproj=2") == 1
    assert "'kproj' selects no layer of the statistics (did you mean 'k_proj'?)" in capsys.readouterr().err
    assert run(*argv, "--rank-pattern", "k_proj=2", "--alpha-pattern", r"layers\.1\..*=4") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 4
    assert config["rank_pattern"] == {rf"model\.layers\.{i}\.self_attn\.k_proj": 2 for i in (0, 1)}
    assert set(config["alpha_pattern"]) == {name.replace(".", r"\.") for name in
                                            loradafast.Statistics.load(stats_file).layers if ".layers.1." in name}
    tensors = adapter_tensors(out)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape[0] == 2
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 4


def test_collect_refuses_to_replace_statistics_unless_asked(files, tmp_path, capsys, forwards):
    stats_file = tmp_path / "stats.safetensors"
    stats_file.write_bytes(b"earlier statistics")
    argv = ["collect", "--model", files["model"], "--data", files["jsonl"], "--out", stats_file, "-q",
            "--max-samples", 2, "--no-split-halves"]
    assert run(*argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert stats_file.read_bytes() == b"earlier statistics" and forwards == []
    assert run(*argv, "--overwrite") == 0
    assert loradafast.Statistics.load(stats_file).num_sequences == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]  # no partial file left


def _save_stats(files, path):
    from transformers import AutoModelForCausalLM

    from tiny import padded_batches, random_sequences

    model = AutoModelForCausalLM.from_pretrained(files["model"])
    loradafast.collect(model, padded_batches(random_sequences(4, vocab=24), 2), progress=False,
                       split_halves=False).save(path)
    return path


@pytest.mark.parametrize("method", ["lora-one", "lora-ga"])  # lora-ga: the rank-2r conversion's config too
def test_solve_writes_lora_dropout(files, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stats_file = _save_stats(files, tmp_path / "stats.safetensors")
    argv = ["solve", "--stats", stats_file, "--method", method, "--rank", 2, "-q"]
    assert run(*argv, "--out", tmp_path / "default") == 0
    assert json.loads((tmp_path / "default" / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    out = tmp_path / "dropout"
    assert run(*argv, "--out", out, "--lora-dropout", 0.1) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1 and config["r"] == (4 if method == "lora-ga" else 2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["model"]), out)
    assert model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_dropout["default"].p == 0.1


def test_solve_refuses_a_bad_dropout_before_reading_the_statistics(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("solve", "--stats", tmp_path / "missing.safetensors", "--out", tmp_path / "a", "--lora-dropout", 1)
    assert exit_.value.code == 2
    assert "argument --lora-dropout: must be at least 0 and less than 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_lora_dropout_from_python(files, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loradafast.integrations.peft_files import lora_config

    result = loradafast.solve(loradafast.Statistics.load(_save_stats(files, tmp_path / "s.safetensors")), 2,
                              method="lora-one", progress=False)
    assert result.lora_config.lora_dropout == 0.0  # as before: PEFT's default
    assert lora_config(result, lora_dropout=0.05).lora_dropout == 0.05
    result.lora_dropout = 0.1
    assert result.save(tmp_path / "a", convert_to_lora=False) == tmp_path / "a"
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    for bad in (1, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="lora_dropout must be"):
            lora_config(result, lora_dropout=bad)

    # initialize(peft_model): the PeftModel's own dropout is kept unless one is given
    model = AutoModelForCausalLM.from_pretrained(files["model"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.2))
    kept = loradafast.initialize(peft_model, method="lora", progress=False)
    assert lora_config(kept).lora_dropout == 0.2
    assert lora_config(kept, lora_dropout=0.0).lora_dropout == 0.0
