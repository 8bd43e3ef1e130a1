"""Every bad input through the real CLI (`python -m flows.cli` in a subprocess): exit code 2, one
paragraph naming the problem (checked by key words, so rewording the fix does not break it), no
traceback, and nothing written: each case runs in a folder of its own (its cwd, HOME, PREFECT_HOME
and LOWREGRET_CACHE) whose file tree, contents included, must be the same afterwards.

The cases run concurrently (4 at a time); most never import torch, Prefect or MLflow, because the
commands check their input first. The module prints the table's wall time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only folders


@dataclasses.dataclass(frozen=True)
class Case:
    """One command line ({M} the tiny model, {F} the shared fixtures folder, {W} the case's folder),
    the words its error must contain and, optionally, words it must not (a value that must be
    accepted, checked by making a later check fail)."""

    id: str
    argv: tuple[str, ...]
    words: tuple[str, ...]
    absent: tuple[str, ...] = ()
    read_only: bool = False  # needs a folder this user cannot write (skipped as root)
    twice_at_once: bool = False  # run two copies concurrently; both must fail cleanly
    with_store: bool = False  # the case's folder already holds an MLflow store


def case(id, *argv, words, **kw) -> Case:
    return Case(id, tuple(argv), tuple(words), **kw)


TINY = ("model={M}", "dataset={F}/good.jsonl", "rank=4", "train.max_steps=2", "train.max_length=64")
CASES = [
    # lowregret plan
    case("plan/non-utf8-data", "plan", "--model", "{M}", "--rank", "4", "--dataset", "{F}/latin1.jsonl",
         words=["latin1.jsonl", "utf-8"]),
    case("plan/out-under-a-file", "plan", "--model", "{M}", "--rank", "4", "--out", "{F}/a-file/report",
         words=["--out", "a-file", "is a file"]),
    case("plan/out-is-a-file", "plan", "--model", "{M}", "--rank", "4", "--out", "{F}/a-file",
         words=["--out", "is a file"]),
    case("plan/out-read-only", "plan", "--model", "{M}", "--rank", "4", "--out", "{F}/read-only/report",
         words=["--out", "read-only"], read_only=True),
    case("plan/rank-beyond-the-matrices", "plan", "--model", "{M}", "--rank", "100000000",
         words=["rank 100000000", "min(d_in, d_out) = 64"]),
    case("plan/unknown-gpu", "plan", "--model", "{M}", "--rank", "4", "--gpu", "TPUv9", words=["unknown gpu", "tpuv9"]),
    case("plan/missing-model-folder", "plan", "--model", "./no-such-model", "--rank", "4",
         words=["no-such-model", "path"]),
    case("plan/empty-dataset", "plan", "--model", "{M}", "--rank", "4", "--dataset", "{F}/empty.jsonl",
         words=["empty.jsonl", "no examples"]),
    # lowregret train
    case("train/non-utf8-data", "train", "model={M}", "dataset={F}/latin1.jsonl", "output_dir={W}/run",
         "max_length=64", words=["latin1.jsonl", "utf-8"]),
    case("train/output-dir-under-a-file", "train", "model={M}", "output_dir={F}/a-file/run",
         words=["output_dir", "a-file", "is a file"]),
    case("train/output-dir-read-only", "train", "model={M}", "output_dir={F}/read-only/run",
         words=["output_dir", "read-only"], read_only=True),
    case("train/mixed-precision-no-is-accepted", "train", "model={M}", "mixed_precision=no",
         "output_dir={F}/a-file/run", words=["output_dir", "is a file"], absent=["mixed_precision"]),
    case("train/max-length-beyond-the-context", "train", "model={M}", "dataset={F}/good.jsonl",
         "max_length=100000", "output_dir={W}/run", words=["max_length=100000", "context", "512"]),
    case("train/unknown-option", "train", "bogus_option=1", words=["unknown", "bogus_option"]),
    case("train/bad-choice", "train", "mixed_precision=fp8", words=["mixed_precision", "fp8", "auto, no, bf16"]),
    case("train/resume-without-checkpoint", "train", "model={M}", "dataset={F}/good.jsonl", "resume={F}/empty-dir",
         "output_dir={W}/run", words=["resume", "no checkpoint"]),
    case("train/missing-config", "train", "--config", "{W}/nope.yaml", words=["nope.yaml", "not found"]),
    # lowregret evaluate / compare / export
    case("evaluate/non-utf8-data", "evaluate", "--model", "{M}", "--dataset", "{F}/latin1.jsonl",
         words=["latin1.jsonl", "utf-8"]),
    case("evaluate/missing-run", "evaluate", "--run", "{W}/no-run", words=["no-run"]),
    case("compare/chart-under-a-file", "compare", "--lora", "{W}/a", "--full", "{W}/b", "--chart",
         "{F}/a-file/curves.png", words=["--chart", "is a file"]),
    case("compare/chart-read-only", "compare", "--lora", "{W}/a", "--full", "{W}/b", "--chart",
         "{F}/read-only/curves.png", words=["--chart", "read-only"], read_only=True),
    case("export/dir-under-a-file", "export", "--vllm", "--adapter-dir", "{W}/adapter", "{F}/a-file/out",
         words=["export dir", "is a file"]),
    case("export/dir-read-only", "export", "--vllm", "--adapter-dir", "{W}/adapter", "{F}/read-only/out",
         words=["export dir", "read-only"], read_only=True),
    # lowregret pipeline / sweep / demo / deploy
    case("pipeline/unknown-gpu", "pipeline", *TINY, "gpu=TPUv9", words=["unknown gpu", "tpuv9"]),
    case("pipeline/unknown-info-method", "pipeline", *TINY, "info_method=bogus", words=["info_method", "bogus"]),
    case("pipeline/unknown-model", "pipeline", *TINY, "model=./no-such-model", words=["no-such-model"]),
    case("pipeline/empty-dataset", "pipeline", *TINY, "dataset={F}/empty.jsonl", words=["empty.jsonl", "no examples"]),
    case("pipeline/non-utf8-data", "pipeline", *TINY, "dataset={F}/latin1.jsonl", words=["latin1.jsonl", "utf-8"]),
    case("pipeline/refresh-baseline-maybe", "pipeline", *TINY, "refresh_baseline=maybe",
         words=["refresh_baseline", "true or false"]),
    case("pipeline/rank-beyond-the-matrices", "pipeline", *TINY, "rank=100000", words=["rank 100000", "min(d_in, d_out)"]),
    case("pipeline/max-length-beyond-the-context", "pipeline", *TINY, "train.max_length=100000",
         words=["max_length=100000", "context"]),
    case("pipeline/mistyped-workdir", "pipeline", "--workdir", "{W}/no-such-dir", *TINY,
         words=["--workdir", "no-such-dir", "does not exist"]),
    case("pipeline/workdir-is-a-file", "pipeline", "--plan-only", "--workdir", "{F}/a-file", *TINY,
         words=["--workdir", "is a file"]),
    case("pipeline/owned-train-key", "pipeline", *TINY, "train.output_dir=x", words=["output_dir", "set by the pipeline"]),
    case("pipeline/mixed-precision-no-is-accepted", "pipeline", *TINY, "train.mixed_precision=no", "gpu=TPUv9",
         words=["unknown gpu"], absent=["mixed_precision"]),
    case("pipeline/bad-config-file", "pipeline", "--config", "{F}/latin1.jsonl", words=["not utf-8"]),
    case("sweep/unknown-method", "sweep", "methods=[bogus]", words=["methods", "bogus"]),
    # lowregret study
    case("study/reanalyse-without-a-study", "study", "--reanalyse", words=["no finished full study", "cells.json"]),
    case("study/reanalyse-quick-without-a-study", "study", "--quick", "--reanalyse", "--workdir", "{W}",
         words=["no finished quick study", "lowregret study --quick"]),
    case("sweep/rank-beyond-the-matrices", "sweep", "base.model={M}", "base.dataset={F}/good.jsonl",
         "methods=[lora]", "ranks=[4,100000]", words=["rank 100000", "min(d_in, d_out)"]),
    case("demo/mistyped-workdir", "demo", "--workdir", "{W}/no-such-dir", words=["--workdir", "does not exist"]),
    case("deploy/bad-cron", "deploy", "--cron", "every night", *TINY, words=["cron", "every night"]),
    # lowregret promote / rollback
    case("rollback/fresh-folder", "rollback", "no-such-model", words=["no model registry"]),
    case("promote/fresh-folder", "promote", "no-such-model", "1", "--reason", "r", words=["no model registry"]),
    case("promote/two-at-once-on-a-fresh-folder", "promote", "m", "1", "--reason", "r",
         words=["no model registry"], twice_at_once=True),
    case("rollback/unknown-model", "rollback", "no-such-model", words=["no registered model", "no-such-model"],
         with_store=True),
    case("promote/unknown-model", "promote", "no-such-model", "3", "--reason", "r",
         words=["no registered model", "no-such-model"], with_store=True),
]


def _tree(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its content (folders as "dir")."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_models):
    from tests.trainer.conftest import write_rows

    root = tmp_path_factory.mktemp("bad-input-fixtures")
    (root / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": " ol\xe9"}\n'.encode("latin-1"))
    (root / "empty.jsonl").write_text("")
    write_rows(root / "good.jsonl")
    (root / "a-file").write_text("a regular file\n")
    (root / "empty-dir").mkdir()
    (root / "read-only").mkdir(mode=0o555)
    return root, tiny_models("llama")


def _store(folder: Path) -> None:
    """An MLflow SQLite store with its schema, where the flows would create it."""
    from flows.settings import initialize_store, load_settings

    settings = load_settings(folder, environ={})
    settings.home.mkdir()
    initialize_store(settings)


def _run(case: Case, folder: Path, fixtures_dir: Path, model: Path) -> list[subprocess.CompletedProcess]:
    home = folder / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env |= {"PYTHONPATH": str(REPO), "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"),
            "LOWREGRET_CACHE": str(home / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [a.format(M=model, F=fixtures_dir, W=folder) for a in case.argv]
    command = [sys.executable, "-m", "flows.cli", *argv]
    started = time.perf_counter()
    copies = [subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2 if case.twice_at_once else 1)]
    done = [subprocess.CompletedProcess(command, p.wait(timeout=300), *p.communicate()) for p in copies]
    return done, time.perf_counter() - started


@pytest.fixture(scope="module")
def outcomes(fixtures, tmp_path_factory):
    """Run every case once, four at a time: {id: (processes, tree before, tree after)}."""
    fixtures_dir, model = fixtures
    folders = {}
    for c in CASES:
        folder = tmp_path_factory.mktemp(c.id.replace("/", "-"))
        (folder / "home").mkdir()
        if c.with_store:
            _store(folder)
        folders[c.id] = folder
    before = {c.id: _tree(folders[c.id]) for c in CASES} | {"fixtures": _tree(fixtures_dir)}
    started = time.perf_counter()
    runnable = [c for c in CASES if not (c.read_only and AS_ROOT)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip([c.id for c in runnable],
                        pool.map(lambda c: _run(c, folders[c.id], fixtures_dir, model), runnable), strict=True))
    print(f"\n{len(runnable)} bad-input cases through the CLI in {time.perf_counter() - started:.1f} s wall "
          "(4 at once); slowest: " + ", ".join(f"{cid} {wall_s:.1f} s" for cid, (_, wall_s) in
                                                sorted(done.items(), key=lambda item: -item[1][1])[:5]))
    fixtures_after = _tree(fixtures_dir)
    return {cid: (procs, before[cid], _tree(folders[cid]), before["fixtures"], fixtures_after)
            for cid, (procs, _) in done.items()}


def test_the_table_has_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_paragraph_and_writes_nothing(case, outcomes):
    if case.read_only and AS_ROOT:
        pytest.skip("root can write into a read-only folder")
    procs, before, after, fixtures_before, fixtures_after = outcomes[case.id]
    for proc in procs:
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith(f"lowregret {case.argv[0]}: error: ")]
        assert len(errors) == 1, proc.stderr[-3000:]
        message = errors[0].lower()
        for word in case.words:
            assert word.lower() in message, (word, errors[0])
        for word in case.absent:
            assert word.lower() not in message, (word, errors[0])
    assert after == before, "the command wrote into its folder"
    assert fixtures_after == fixtures_before, "a command wrote into the shared fixtures"
