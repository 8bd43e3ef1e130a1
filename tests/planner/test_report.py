"""Reports: files written, HTML self-contained, nothing half-written on failure."""

import json

import pytest

from planner.plan import build_plan
from planner.report import chart_titles, render_html, render_markdown, verdict, write_report
from tests.planner.fakes import FakeProfile


@pytest.fixture(scope="module")
def plan():
    return build_plan("Qwen3-30B-A3B", 16, profile=FakeProfile(5e7, 3 * 10**7, examples=5000, total_tokens=6 * 10**7),
                      calibration={})  # the priors: the verdicts below are set at 2 bits/param


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

    monkeypatch.setattr(report, "memory_chart", boom)
    with pytest.raises(RuntimeError):
        write_report(plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_markdown_names_verdict_and_matrices(plan):
    text = render_markdown(plan)
    assert plan.capacity.verdict.upper() in text
    assert "| experts.gate_up_proj | routed_expert | 2,048 | 1,536 | 6,144 | 2 |" in text


@pytest.mark.parametrize("bits, level, headline", [
    (5e7, "low-regret", "LOW-REGRET: LoRA rank 16 should match full fine-tuning"),
    (1.2e8, "borderline", "BORDERLINE: LoRA rank 16 may fall short of full fine-tuning"),
    (4e8, "capacity-constrained", "CAPACITY-CONSTRAINED: LoRA rank 16 is expected to fall behind full fine-tuning"),
])
def test_banner_per_verdict(bits, level, headline):
    plan = build_plan("Qwen3-30B-A3B", 16, profile=FakeProfile(bits, 3 * 10**7, examples=5000, total_tokens=6 * 10**7),
                      calibration={})
    assert plan.capacity.verdict == level
    assert verdict(plan)[:2] == (level, headline)
    page = render_html(plan, {"capacity.png": b"x", "memory.png": b"x"})
    assert f'<div class="banner {level}" id="verdict"><strong>{headline}</strong>' in page


def test_banner_without_data_and_what_lora_needs(plan):
    assert verdict(build_plan("Llama-3.1-8B", 16))[:2] == ("none", "NO VERDICT: no dataset given")
    lora = next(f for f in plan.hardware if f.method == "lora")
    assert f"LoRA needs {lora.num_gpus} x H100-80GB-SXM (micro-batch {lora.micro_batch}" in verdict(plan)[2]


def test_sections_tables_not_dicts(plan):
    text, page = render_markdown(plan), render_html(plan, {"capacity.png": b"x", "memory.png": b"x"})
    for title in ("Model and adapter", "Data and lengths", "Capacity", "Memory per method", "FLOPs and time", "Advice",
                  "Assumptions and sources"):
        assert f"## {title}\n" in text and f"<h2>{title}</h2>" in page
    assert "{'" not in text and "{'" not in page  # constants as readable values, not Python reprs
    assert "| bytes_per_param.lora | frozen 2, frozen outer 2, weight 4, grad 4, optimizer 8 |" in text
    assert "<script" not in page and "http" not in page.split("</style>")[0]  # self-contained


def test_memory_rows_at_the_recommended_micro_batch(plan):
    """The memory chart and table show each method at the micro-batch the fit table recommends."""
    for fit in plan.hardware:
        at_fit = [m for m in plan.memory if m.method == fit.method and m.num_gpus == fit.num_gpus]
        assert len(at_fit) == 1
        assert at_fit[0].micro_batch == fit.micro_batch
        assert at_fit[0].gradient_checkpointing == fit.gradient_checkpointing
        assert at_fit[0].total_bytes == pytest.approx(fit.total_bytes)
        assert {m.num_gpus for m in plan.memory if m.method == fit.method} >= {1, 2, 4, 8}


def test_chart_titles_name_model_data_and_verdict(plan):
    for title in chart_titles(plan).values():
        assert title.startswith("Qwen3-30B-A3B on fake: LOW-REGRET")


def test_log_axis_ticks_are_plain_numbers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planner.report_charts import plain_log_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3, 16], [3, 2, 1.5, 1])
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_xminorticklabels() if t.get_text()]
    plt.close(fig)
    assert {"1", "2", "5", "10"} <= set(labels)
    assert all(label.replace(".", "").replace(",", "").isdigit() for label in labels), labels  # no 2×10⁰
