import os

import pytest

# No test may reach a hub: our machines have no network (DESIGN.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(autouse=True)
def _cli_quiet_settings_stay_in_their_test():
    """`flows.cli.main` exports quiet defaults and adds warning filters (flows.cli.quiet): undo both
    after each test so one test's CLI call does not change what another sees."""
    import warnings

    from flows.cli import QUIET_ENVIRONMENT

    before = {key: os.environ.get(key) for key in QUIET_ENVIRONMENT}
    filters = warnings.filters[:]
    yield
    warnings.filters[:] = filters
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Tokenized datasets go to a folder of this session, not the user's ~/.cache (subprocesses inherit it)."""
    previous = os.environ.get("LOWREGRET_TOKEN_CACHE")
    os.environ["LOWREGRET_TOKEN_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))
    yield os.environ["LOWREGRET_TOKEN_CACHE"]
    if previous is None:
        os.environ.pop("LOWREGRET_TOKEN_CACHE")
    else:
        os.environ["LOWREGRET_TOKEN_CACHE"] = previous


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
