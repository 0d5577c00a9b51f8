"""The sample persona data, installed as `persona_lora.sample_data`: the tiny base trains its tokenizer on it."""
