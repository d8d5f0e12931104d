"""Where loradafast meets other libraries: :mod:`.peft` (adapter files, LoRA layers, LoraConfigs)."""
