"""study.knee_from_runs: which run folders make the knee table, and a clear refusal when none do."""

import json

from study.knee_from_runs import knee_cells, main


def _run(root, part, label, kind="sweep", **config):
    folder = root / part / kind / label
    folder.mkdir(parents=True)
    # Every real summary has the trainer's config hash; a sweep cell's run key is its folder's suffix.
    summary = {"config": {"targets": "all", "rank": 16} | config, "config_hash": "ffff"}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_knee_cells_keep_the_all_layer_runs_at_the_chosen_lrs(tmp_path):
    _run(tmp_path, "study-full-knee-n256", "lora-r4-lr0.003-aaaa", method="lora", rank=4, lr=0.003)
    _run(tmp_path, "study-full-knee-n256", "full-lr0.01-bbbb", method="full", lr=0.01)
    _run(tmp_path, "study-full-knee-n256", "lora-r4-lr0.001-cccc", method="lora", rank=4, lr=0.001)  # other LR
    _run(tmp_path, "study-full-knee-n1024-mlp", "lora-r7-lr0.003-dddd", method="lora", rank=7, lr=0.003)  # layers
    _run(tmp_path, "study-full-knee-n1024", "lora-r2-lr0.003-eeee", method="lora", rank=2, lr=0.003, targets="mlp")
    _run(tmp_path, "study-full-knee-n1024", "lora-r8-lr0.003", "train", method="lora", rank=8, lr=0.003)
    cells = knee_cells(tmp_path, "full", 0.003, 0.01)
    assert sorted((c.method, c.rank, c.tags["n_facts"], c.run_key) for c in cells) == [
        ("full", None, 256, "bbbb"), ("lora", 4, 256, "aaaa"), ("lora", 8, 1024, "ffff")]


def test_no_runs_is_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "knee.json"
    assert main(["--workdir", str(tmp_path), "--lora-lr", "0.003", "--full-lr", "0.01", "--out", str(out)]) == 2
    assert "lowregret sweep --config" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
