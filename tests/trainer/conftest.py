import json

import pytest

_WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow"]


def write_rows(path, n=48, prompt_words=1):
    """A learnable prompt/completion set: each prompt word maps to a fixed two-word answer."""
    with open(path, "w") as f:
        for i in range(n):
            word = _WORDS[i % len(_WORDS)]
            answer = f"{_WORDS[(i * 5 + 3) % len(_WORDS)]} {_WORDS[(i * 7 + 1) % len(_WORDS)]}"
            prompt = " ".join([f"question {word}"] * prompt_words)
            f.write(json.dumps({"prompt": prompt + " answer:", "completion": " " + answer}) + "\n")
    return path


@pytest.fixture
def rows_file(tmp_path):
    return write_rows(tmp_path / "rows.jsonl")


@pytest.fixture
def tiny_config(tiny_models, rows_file, tmp_path):
    """Factory of small, fast TrainConfigs on a tiny model."""
    from trainer.config import TrainConfig

    def make(**overrides):
        fields = dict(
            model=str(tiny_models(overrides.pop("arch", "llama"))),
            dataset=str(rows_file),
            method="lora",
            rank=4,
            lr=1e-2,
            max_steps=8,
            batch_size=4,
            max_length=64,
            eval_points=3,
            eval_max_examples=8,
            checkpoint_every=0,
            output_dir=str(tmp_path / "run"),
        )
        fields.update(overrides)
        return TrainConfig(**fields)

    return make
