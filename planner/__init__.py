"""Capacity planning for LoRA runs: pure math over model shapes, adapters and datasets.

Nothing heavy is imported here: torch, transformers, prefect and mlflow are imported lazily
inside the few functions that need them, so `lowregret plan` answers in well under a second.
"""
