"""A reward a tiny random model earns by chance and can learn to earn more of, for the RL tests."""


def vowel_share(prompt: str, completion: str, answer: str) -> float:
    """Share of the completion's characters that are vowels (0 for an empty completion)."""
    return sum(c in "aeiou" for c in completion) / len(completion) if completion else 0.0


def vowel_share_but_none_for_zero(prompt: str, completion: str, answer: str) -> float:
    """`vowel_share`, except 0 for every completion of a prompt whose answer is 0 mod 3: those groups carry
    no signal, so the processes of a step hold unequal numbers of episodes to train on."""
    return 0.0 if int(answer) % 3 == 0 else vowel_share(prompt, completion, answer)
