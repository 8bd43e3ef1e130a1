"""LoRA and FullFT training with torch + transformers + peft + datasets."""
