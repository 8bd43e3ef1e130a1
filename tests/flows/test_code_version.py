"""The baseline cache key covers every first-party file a training run executes, and only those."""

import shutil
from pathlib import Path

from flows.tasks import code_version, training_sources

ROOT = Path(__file__).resolve().parents[2]


def _copy(tmp_path):
    for package in ("data", "planner", "trainer", "evaluation", "flows"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_tokenization_change_in_the_data_layer_changes_the_key(tmp_path):
    copy = _copy(tmp_path)
    before = code_version(copy)
    assert before == code_version(ROOT)  # the key depends on the files, not on where they are
    sources = {p.relative_to(copy).as_posix() for p in training_sources(copy)}
    assert {"data/dataset.py", "data/render.py", "trainer/loop.py", "trainer/loss.py", "data/builtin_datasets.py"} <= sources
    render = copy / "data" / "render.py"
    text = render.read_text()
    assert "    def examples(" in text
    render.write_text(text.replace("    def examples(", "    def examples(  # masking changed\n", 1))
    code_version.cache_clear()
    assert code_version(copy) != before


def test_files_a_run_never_executes_leave_the_key_alone(tmp_path):
    copy = _copy(tmp_path)
    before = code_version(copy)
    assert "planner/report.py" not in {p.relative_to(copy).as_posix() for p in training_sources(copy)}
    (copy / "planner" / "report.py").write_text("# the plan report changed\n")
    (copy / "evaluation" / "compare.py").write_text("# the gate changed\n")
    code_version.cache_clear()
    assert code_version(copy) == before
