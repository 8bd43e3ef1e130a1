"""A stand-in with DatasetProfile's fields (ARCHITECTURE.md), for testing the verdict alone."""

from dataclasses import dataclass


@dataclass(frozen=True)
class FakeProfile:
    information_bits: float
    completion_tokens: int
    examples: int = 1000
    total_tokens: int = 0
    source: str = "fake"
    format: str = "chat"
    sampled_examples: int = 1000
    total_tokens_stderr: float = 0.0
    completion_tokens_stderr: float = 0.0
    information_method: str = "exact"
    bits_per_completion_token: float = 1.0
    tokenizer: str = "fake"
    notes: tuple = ()
