"""curves.json parsing and the learning-curve chart."""

import pytest

from data.errors import UserError
from evaluation.curves import curve_styles, load_curves, parse_curves, plot_curves


def test_parse_sorts_and_defaults_missing_kind():
    c = parse_curves({"eval": [[20, 1.0], [10, 1.5]]})
    assert c == {"train": [], "eval": [(10, 1.5), (20, 1.0)]}


@pytest.mark.parametrize(
    "record", [[], {"eval": [[1, 2, 3]]}, {"train": [["a", 1.0]]}, {"eval": [[1, True]]}]
)
def test_parse_rejects_bad_records(record):
    with pytest.raises(UserError):
        parse_curves(record)


def test_load_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_curves(tmp_path / "curves.json")


def test_plot_writes_a_real_png(tmp_path):
    import matplotlib.image

    runs = {
        "LoRA r=16": {
            "train": [(s, 2.0 / s**0.2) for s in range(1, 200)],
            "eval": [(0, 2.1), (10, 1.4), (50, 1.2), (199, 1.1)],
        },
        "FullFT": {
            "train": [(s, 1.9 / s**0.2) for s in range(1, 200)],
            "eval": [(0, 2.1), (10, 1.3), (50, 1.15), (199, 1.08)],
        },
    }
    path = plot_curves(runs, tmp_path / "sub" / "curves.png", methods={"LoRA r=16": "lora", "FullFT": "full"},
                       base_loss=2.1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 500
    # not a blank canvas: many distinct colours were drawn
    assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::97].round(2).tolist()}) > 20


def test_one_colour_per_method_whatever_the_order():
    """`compare` lists LoRA first, the pipeline FullFT first: each method keeps its colour in both."""
    from planner.report_charts import METHOD_COLOURS

    compare = curve_styles({"LoRA (lora)": "lora", "FullFT (full)": "full"})
    pipeline = curve_styles({"FullFT": "full", "LoRA r=16": "lora"})
    assert compare["LoRA (lora)"] == pipeline["LoRA r=16"] == (METHOD_COLOURS["lora"], "-")
    assert compare["FullFT (full)"] == pipeline["FullFT"] == (METHOD_COLOURS["full"], "-")
    sweep = curve_styles({"lora-r8-lr0.001": "lora", "lora-r8-lr0.002": "lora", "full-lr0.0001": "full"})
    assert [c for c, _ in sweep.values()] == [METHOD_COLOURS["lora"], METHOD_COLOURS["lora"], METHOD_COLOURS["full"]]
    assert sweep["lora-r8-lr0.001"][1] != sweep["lora-r8-lr0.002"][1]
