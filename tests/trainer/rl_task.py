"""A reward a tiny random model earns by chance and can learn to earn more of, for the RL tests."""


def vowel_share(prompt: str, completion: str, answer: str) -> float:
    """Share of the completion's characters that are vowels (0 for an empty completion)."""
    return sum(c in "aeiou" for c in completion) / len(completion) if completion else 0.0
