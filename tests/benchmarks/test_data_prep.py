"""The data-preparation benchmark runs end to end on a tiny model and a small generated JSONL.

Times are not asserted (the benchmark prints them; docs/DATA.md records a real run); this checks
that it times the pipeline's four data steps and that the second pass reuses the token cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess importing Prefect and transformers: ~30 s on 2 cores
def test_tiny_run_times_the_four_data_steps(tmp_path, tiny_models):
    out, cache = tmp_path / "times.json", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_prep.py"), "--rows", "60", "--data",
           str(tmp_path / "rows.jsonl"), "--model", str(tiny_models("llama")), "--max-length", "512",
           "--passes", "2", "--cache", str(cache), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    payload = json.loads(out.read_text())
    assert payload["rows"] == 60
    assert [(r["pass"], r["step"]) for r in payload["results"]] == [
        (p, s) for p in (1, 2) for s in ("check_inputs", "plan profile", "prepare FullFT", "prepare LoRA")]
    assert len([p for p in cache.iterdir() if p.name != "sources"]) == 1  # one tokenization for all eight steps
