"""The step-speed benchmark runs end to end (tiny shape, CPU) and writes its JSON and table.

Speed is not asserted here (that is what the benchmark prints); this checks the benchmark itself
works and that our loss path computes the same first loss as the plain transformers path.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_writes_results(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--preset", "tiny", "--device", "cpu",
           "--steps", "1", "--warmup", "1", "--seq-len", "32", "--batch", "2",
           "--setups", "full-plain-bf16,lora-plain,full-ours-bf16,lora-ours", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    payload = json.loads(out.with_suffix(".json").read_text())
    results = {r["setup"]: r for r in payload["results"]}
    assert set(results) == {"full-plain-bf16", "lora-plain", "full-ours-bf16", "lora-ours"}
    # Same weights and batch: the first loss differs only by summation order.
    assert abs(results["lora-ours"]["loss_first"] - results["lora-plain"]["loss_first"]) < 1e-4
    assert abs(results["full-ours-bf16"]["loss_first"] - results["full-plain-bf16"]["loss_first"]) < 1e-4
    assert results["lora-ours"]["trainable_params"] < results["full-ours-bf16"]["trainable_params"]
    assert "| lora-ours |" in out.with_suffix(".md").read_text()
