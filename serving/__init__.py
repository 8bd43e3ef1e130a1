"""Serving: one base model, many LoRA adapters, an OpenAI-style HTTP API, and vLLM export."""
