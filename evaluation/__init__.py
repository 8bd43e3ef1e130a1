"""Held-out log loss, LoRA-vs-FullFT regret, learning curves, LR-sweep analysis."""
