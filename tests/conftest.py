import os

import pytest

# No test may reach a hub: our machines have no network (DESIGN.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory: tiny_models("llama") -> path of a saved tiny model (built once per session)."""
    from tests.tiny import tiny_model_dir

    root = tmp_path_factory.mktemp("tiny-models")
    return lambda arch="llama": tiny_model_dir(root, arch)


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
