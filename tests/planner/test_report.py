"""Reports: files written, HTML self-contained, nothing half-written on failure."""

import json

import pytest

from planner.plan import build_plan
from planner.report import render_markdown, write_report
from tests.planner.fakes import FakeProfile


@pytest.fixture(scope="module")
def plan():
    return build_plan("Qwen3-30B-A3B", 16, profile=FakeProfile(5e7, 3 * 10**7, examples=5000, total_tokens=6 * 10**7))


def test_write_report(plan, tmp_path):
    files = write_report(plan, tmp_path / "out")
    assert sorted(files) == ["capacity.png", "memory.png", "plan.html", "plan.json", "plan.md"]
    assert json.loads(files["plan.json"].read_text())["adapter_params"] == plan.adapter_params
    page = files["plan.html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and "src=\"capacity.png\"" not in page
    assert files["capacity.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_existing_folder_keeps_other_files(plan, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    write_report(plan, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "plan.json").is_file()


def test_failure_leaves_nothing(plan, tmp_path, monkeypatch):
    import planner.report as report

    def boom(*args):
        raise RuntimeError("chart failed")

    monkeypatch.setattr(report, "_memory_chart", boom)
    with pytest.raises(RuntimeError):
        write_report(plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_markdown_names_verdict_and_matrices(plan):
    text = render_markdown(plan)
    assert plan.capacity.verdict.upper() in text
    assert "| experts.gate_up_proj | routed_expert | 2048 | 1536 | 6144 | 2 |" in text
