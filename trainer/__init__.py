"""LoRA and FullFT training with torch + transformers + peft + datasets.

Public API (imported lazily so `import trainer` stays light): `TrainConfig`, `load_config`,
`train`, `TrainResult`, `load_base_model`, `load_trained`.
"""

_EXPORTS = {
    "TrainConfig": "trainer.config",
    "load_config": "trainer.config",
    "TrainResult": "trainer.result",
    "train": "trainer.loop",
    "load_base_model": "trainer.model",
    "load_trained": "trainer.model",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
