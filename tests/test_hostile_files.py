"""Hostile files and damaged state, through the real command line (`flows.cli.main`, in this process
for speed; tests/flows/test_bad_inputs.py runs its 45 cases as subprocesses): each must end with exit
code 2 and one `lowregret CMD: error:` paragraph naming the problem (checked by key words), never a
traceback (an exception escaping `main` fails the test), and leave its folder's file tree and every
file's content unchanged. The classes are docs/RELIABILITY.md's section 8: damaged data files, small
inputs that would take huge resources (the limits of `data.guard`), numbers out of range, tampered
run files and checkpoints, damaged model files, output paths that are links, a damaged registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

ROWS = [{"prompt": f"What is {i} + {i}?", "completion": f" {2 * i}"} for i in range(40)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)
PLAN = ("plan", "--model", "{M}", "--rank", "4", "--dataset")
TRAIN = ("train", "model={M}", "dataset=d.jsonl", "max_steps=2", "max_length=64", "output_dir=out")
DEEP = "[" * 100_000 + "]" * 100_000


def conversation(n: int, key: str = "messages") -> str:
    if key == "conversations":
        turns = [{"from": f, "value": "x"} for _ in range(n // 2) for f in ("human", "gpt")]
    else:
        turns = [{"role": r, "content": "x"} for _ in range(n // 2) for r in ("user", "assistant")]
    return json.dumps({key: turns}) + "\n" + JSONL


def run_files(lora: dict | None = None, full: dict | None = None) -> dict:
    """Two finished runs as the trainer writes them, with `lora`'s / `full`'s files replaced."""
    def one(method):
        config = {"model": "tiny", "seed": 0, "method": method}
        return {"summary.json": json.dumps({"method": method, "config": config, "data_fingerprint": "d"}),
                "curves.json": json.dumps({"train": [[1, 2.0]], "eval": [[0, 3.0], [1, 2.0]]}),
                "eval_scores.json": json.dumps({"objective": "supervised", "score": "nll", "ids": ["a", "b"],
                                                "weights": [2, 2], "by_step": [[0, [6.0, 6.0]], [1, [4.0, 4.0]]]})}
    files = {f"l/{k}": v for k, v in (one("lora") | (lora or {})).items()}
    return files | {f"f/{k}": v for k, v in (one("full") | (full or {})).items()}


COMPARE = ("compare", "--lora", "l", "--full", "f")

# (id, files in the case's folder, argv, key words of the error, environment)
CASES = [
    # --- 1. data readers -------------------------------------------------------------------------
    ("jsonl/lone-surrogate", {"d.jsonl": JSONL + '{"prompt": "q\\ud800", "completion": " a"}\n'}, PLAN + ("d.jsonl",),
     ["row 40", "surrogate"], {}),
    ("jsonl/nested-100000-deep", {"d.jsonl": '{"prompt": ' + DEEP + "}\n"}, PLAN + ("d.jsonl",), ["line 1", "nesting"], {}),
    ("jsonl/line-over-the-row-limit", {"d.jsonl": json.dumps({"prompt": "q", "completion": "a" * 5000}) + "\n"},
     PLAN + ("d.jsonl",), ["line 1", "row_bytes", "LOWREGRET_LIMIT_ROW_BYTES"], {"LOWREGRET_LIMIT_ROW_BYTES": "1000"}),
    ("json/row-text-over-the-row-limit", {"d.json": json.dumps([{"messages": [
        {"role": "user", "content": "q" * 600}, {"role": "assistant", "content": "a" * 600}]}])},
     PLAN + ("d.json",), ["row 0", "row_bytes"], {"LOWREGRET_LIMIT_ROW_BYTES": "1100"}),
    ("jsonl/an-array-row", {"d.jsonl": "[1, 2]\n"}, PLAN + ("d.jsonl",), ["line 1", "json object"], {}),
    ("jsonl/invalid-json", {"d.jsonl": JSONL + '{"prompt": "q", \n'}, PLAN + ("d.jsonl",), ["line 41", "not valid json"], {}),
    ("jsonl/nan-completion", {"d.jsonl": JSONL + '{"prompt": "q", "completion": NaN}\n'}, PLAN + ("d.jsonl",),
     ["completion", "string"], {}),
    ("jsonl/huge-number-completion", {"d.jsonl": JSONL + '{"prompt": "q", "completion": 1e400}\n'}, PLAN + ("d.jsonl",),
     ["completion", "string"], {}),
    ("jsonl/bom-and-latin1", {"d.jsonl": b"\xef\xbb\xbf" + JSONL.encode() + b'{"prompt": "caf\xe9"}\n'},
     PLAN + ("d.jsonl",), ["utf-8"], {}),
    ("json/nested-100000-deep", {"d.json": DEEP}, PLAN + ("d.json",), ["d.json", "nesting"], {}),
    ("json/file-over-the-limit", {"d.json": json.dumps(ROWS)}, PLAN + ("d.json",), ["file_bytes", "jsonl"],
     {"LOWREGRET_LIMIT_FILE_BYTES": "1500"}),  # above the model config.json (716 B)
    ("json/a-number", {"d.json": "42"}, PLAN + ("d.json",), ["list of objects"], {}),
    ("json/list-of-strings", {"d.json": '["a", "b"]'}, PLAN + ("d.json",), ["list of objects"], {}),
    ("json/row-nested-deep", {"d.json": json.dumps([{"prompt": [[[[[[[[[[[["x"]]]]]]]]]]]], "completion": "a"}] * 3)},
     PLAN + ("d.json",), ["nesting", "json_depth"], {"LOWREGRET_LIMIT_JSON_DEPTH": "8"}),
    ("csv/extra-fields", {"d.csv": "prompt,completion\nq,a\nq2,a2,EXTRA\n"}, PLAN + ("d.csv",),
     ["line 3", "more field"], {}),
    ("csv/missing-fields", {"d.csv": "prompt,completion\nq,a\nq2\n"}, PLAN + ("d.csv",), ["line 3", "fewer fields"], {}),
    ("csv/field-over-the-limit", {"d.csv": "prompt,completion\nq," + "a" * 3000 + "\n"}, PLAN + ("d.csv",),
     ["line", "row_bytes"], {"LOWREGRET_LIMIT_ROW_BYTES": "1000"}),
    ("csv/header-only", {"d.csv": "prompt,completion\n"}, PLAN + ("d.csv",), ["d.csv"], {}),
    ("csv/messages-cell-not-json", {"d.csv": 'messages\n"[{""role"": ""user"""\n'}, PLAN + ("d.csv",),
     ["messages", "not valid json"], {}),
    ("csv/messages-cell-nested-deep", {"d.csv": "messages\n" + "[" * 5000 + "]" * 5000 + "\n"}, PLAN + ("d.csv",),
     ["messages", "nesting"], {}),
    ("csv/latin1", {"d.csv": "prompt,completion\ncaf\xe9,a\n".encode("latin1")}, PLAN + ("d.csv",), ["utf-8"], {}),
    ("parquet/garbage", {"d.parquet": b"PAR1" + bytes(range(256)) * 20 + b"PAR1"}, PLAN + ("d.parquet",),
     ["d.parquet", "parquet"], {}),
    ("parquet/truncated", {"d.parquet": "TRUNCATED_PARQUET"}, PLAN + ("d.parquet",), ["d.parquet", "parquet"], {}),
    ("saved/bad-state-json", {"ds/state.json": "{not json", "ds/dataset_info.json": "{}"}, PLAN + ("ds",),
     ["ds", "save_to_disk"], {}),
    ("saved/missing-arrow-file", {"ds/state.json": json.dumps({"_data_files": [{"filename": "data-00000.arrow"}],
                                                            "_fingerprint": "x", "_format_columns": None,
                                                            "_format_kwargs": {}, "_format_type": None,
                                                            "_output_all_columns": False, "_split": None}),
                                  "ds/dataset_info.json": "{}"}, PLAN + ("ds",), ["ds", "save_to_disk"], {}),
    ("chat/5000-turns", {"d.jsonl": conversation(5000)}, PLAN + ("d.jsonl",), ["row 0", "turns", "5,000"], {}),
    ("sharegpt/5000-turns", {"d.jsonl": conversation(5000, "conversations")}, PLAN + ("d.jsonl",), ["turns"], {}),
    ("chat/turns-over-a-lowered-limit", {"d.jsonl": conversation(10)}, PLAN + ("d.jsonl",), ["turns", "limit of 4"],
     {"LOWREGRET_LIMIT_TURNS": "4"}),
    ("chat/messages-not-a-list", {"d.jsonl": '{"messages": "hi"}\n' * 3}, PLAN + ("d.jsonl",), ["messages"], {}),
    ("chat/message-without-role", {"d.jsonl": '{"messages": [{"content": "hi"}]}\n' * 3}, PLAN + ("d.jsonl",),
     ["message 0", "role"], {}),
    ("data/unknown-columns", {"d.jsonl": '{"q": "a", "z": "b"}\n' * 3}, PLAN + ("d.jsonl",), ["columns"], {}),
    ("data/bad-limit-variable", {"d.jsonl": JSONL}, PLAN + ("d.jsonl",), ["LOWREGRET_LIMIT_ROW_BYTES", "positive"],
     {"LOWREGRET_LIMIT_ROW_BYTES": "lots"}),
    # --- 3./4. configs and numbers ---------------------------------------------------------------
    ("yaml/alias-bomb", {"c.yaml": "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcde", "bcdef", strict=True))
        + "targets: [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"}, ("train", "--config", "c.yaml"), ["yaml_nodes", "aliases"], {}),
    ("yaml/nested-5000-deep", {"c.yaml": "targets: " + "[" * 5000 + "]" * 5000 + "\n"},
     ("train", "--config", "c.yaml"), ["nesting"], {}),
    ("yaml/over-the-size-limit", {"c.yaml": "# " + "x" * 3000 + "\nmax_steps: 2\n"}, ("train", "--config", "c.yaml"),
     ["yaml_bytes"], {"LOWREGRET_LIMIT_YAML_BYTES": "1000"}),
    ("yaml/python-object-tag", {"c.yaml": "seed: !!python/object/apply:os.system ['touch PWNED']\n"},
     ("train", "--config", "c.yaml"), ["not valid yaml"], {}),
    ("yaml/a-list", {"c.yaml": "- 1\n- 2\n"}, ("train", "--config", "c.yaml"), ["mapping"], {}),
    ("yaml/override-nested-deep", {}, ("train", "targets=" + "[" * 3000 + "]" * 3000), ["nesting"], {}),
    ("number/seed-minus-one", {"d.jsonl": JSONL}, TRAIN + ("seed=-1",), ["seed=-1", "at least 0"], {}),
    ("number/seed-2-to-the-40", {"d.jsonl": JSONL}, TRAIN + ("seed=1099511627776",), ["seed", "at most"], {}),
    ("number/alpha-inf", {"d.jsonl": JSONL}, TRAIN + ("alpha=.inf",), ["alpha", "finite"], {}),
    ("number/lr-nan", {"d.jsonl": JSONL}, TRAIN + ("lr=.nan",), ["lr", "finite"], {}),
    ("number/max-steps-1e12", {"d.jsonl": JSONL}, TRAIN + ("max_steps=1000000000000",), ["max_steps", "at most"], {}),
    ("number/max-steps-1e12-in-yaml", {"d.jsonl": JSONL, "c.yaml": "max_steps: 1000000000000\n"},
     ("train", "--config", "c.yaml", "model={M}", "dataset=d.jsonl"), ["max_steps", "at most"], {}),
    ("number/num-epochs-1e15", {"d.jsonl": JSONL}, TRAIN + ("max_steps=null", "num_epochs=1e15"),
     ["num_epochs", "at most"], {}),
    ("number/grad-accum-1e9", {"d.jsonl": JSONL}, TRAIN + ("grad_accum_steps=1000000000",), ["grad_accum_steps"], {}),
    ("number/batch-size-1e8", {"d.jsonl": JSONL}, TRAIN + ("batch_size=100000000",), ["batch_size", "at most"], {}),
    ("number/rank-1e9", {"d.jsonl": JSONL}, TRAIN + ("rank=1000000000",), ["rank 1000000000", "min(d_in, d_out)"], {}),
    ("number/eval-points-1e9", {"d.jsonl": JSONL}, TRAIN + ("eval_points=1000000000",), ["eval_points"], {}),
    ("number/rl-group-size-1e9", {}, ("rl-train", "group_size=1000000000"), ["group_size", "at most"], {}),
    ("number/pipeline-lr-inf", {}, ("pipeline", "lora_lr=.inf"), ["lora_lr", "finite"], {}),
    ("name/pipeline-a-slash-b", {}, ("pipeline", "name=a/b"), ["name", "registered model name"], {}),
    ("name/promote-a-slash-b", {}, ("promote", "a/b", "1", "--reason", "test"), ["a/b", "registered model name"], {}),
    ("name/rollback-a-slash-b", {}, ("rollback", "a/b"), ["a/b", "registered model name"], {}),
    # --- 8. tampered run files -------------------------------------------------------------------
    ("runs/scores-nested-deep", run_files({"eval_scores.json": DEEP}), COMPARE, ["eval_scores.json", "nesting"], {}),
    ("runs/scores-ids-a-number", run_files({"eval_scores.json": json.dumps(
        {"objective": "supervised", "ids": 5, "weights": [], "by_step": []})}), COMPARE, ["score file", "ids"], {}),
    ("runs/scores-of-strings", run_files({"eval_scores.json": json.dumps(
        {"objective": "supervised", "ids": ["a", "b"], "weights": [2, 2], "by_step": [[0, ["x", "y"]]]})}),
     COMPARE, ["score file", "not a number"], {}),
    ("runs/scores-steps-not-pairs", run_files({"eval_scores.json": json.dumps(
        {"objective": "supervised", "ids": ["a"], "weights": [1], "by_step": [7]})}), COMPARE, ["score file"], {}),
    ("runs/scores-over-the-file-limit", run_files(), COMPARE, ["file_bytes"], {"LOWREGRET_LIMIT_FILE_BYTES": "50"}),
    ("runs/scores-of-an-rl-run", run_files(full={"eval_scores.json": json.dumps(
        {"objective": "rl", "ids": ["a", "b"], "weights": [1, 1], "by_step": [[0, [1.0, 0.0]]]})}), COMPARE,
     ["'rl' run", "rl-compare"], {}),
    ("runs/curves-train-a-number", run_files({"curves.json": '{"train": 7, "eval": []}'}), COMPARE,
     ["curves.json", "train"], {}),
    ("runs/curves-nested-deep", run_files({"curves.json": DEEP}), COMPARE, ["curves.json", "nesting"], {}),
    ("runs/summary-a-list", run_files({"summary.json": "[]"}), COMPARE, ["summary.json", "json object"], {}),
    ("runs/summary-not-json", run_files({"summary.json": "{oops"}), COMPARE, ["summary.json", "not valid json"], {}),
    ("runs/summary-not-utf8", run_files({"summary.json": b"\xff\xfe{}"}), COMPARE, ["summary.json", "utf-8"], {}),
    ("runs/rl-curves-wrong-shape", {f"{d}/{k}": v for d, method in (("l", "lora"), ("f", "full")) for k, v in {
        "summary.json": json.dumps({"method": method, "config": {"model": "m", "reward": "exact", "max_new_tokens": 4},
                                    "data_fingerprint": "d"}),
        "curves.json": '{"eval_accuracy": "high"}',
        "eval_scores.json": json.dumps({"objective": "rl", "ids": ["p"], "weights": [1], "by_step": [[0, [1.0]]]}),
    }.items()}, ("rl-compare", "--lora", "l", "--full", "f"), ["curves.json", "rl curves"], {}),
    # --- 7. output paths the OS refuses even to root -------------------------------------------------
    ("paths/plan-out-under-proc", {}, ("plan", "--model", "{M}", "--rank", "4", "--out", "/proc/lowregret-report"),
     ["--out", "/proc", "cannot be written"], {}),
    ("paths/train-output-dir-under-sys", {"d.jsonl": JSONL}, (*TRAIN[:-1], "output_dir=/sys/lowregret-run"),
     ["output_dir", "/sys", "cannot be written"], {}),
    # --- 6. registry state -------------------------------------------------------------------------
    ("registry/models-on-a-damaged-store", {".lowregret/mlflow.db": b"not a database" * 100}, ("models",),
     ["mlflow.db", "not an sqlite database"], {}),
    ("registry/promote-on-a-damaged-store", {".lowregret/mlflow.db": b"SQLite format 3\x00" + b"\x00\xff" * 600},
     ("promote", "tiny", "1", "--reason", "test"), ["mlflow.db"], {}),
    ("registry/export-without-a-registry", {}, ("export", "--vllm", "tiny@champion", "out"),
     ["no model registry"], {}),
    ("registry/serve-without-a-registry", {}, ("serve", "--base", "{M}", "--adapter", "tiny@champion"),
     ["no model registry"], {}),
    ("registry/rollback-on-a-truncated-store", {".lowregret/mlflow.db": "TRUNCATED_STORE"}, ("rollback", "tiny"),
     ["mlflow.db"], {}),
]

# Cases that need the tiny model's files damaged, a finished or checkpointed run, or links: built in `setup`.
MODEL_CASES = [
    ("model/safetensors-header-lies", "header", ["could not load", "safetensorerror"]),
    ("model/weights-truncated", "truncated", ["could not load"]),
    ("model/config-not-json", "config", ["could not load"]),
    ("model/custom-code-auto-map", "auto_map", ["could not load", "my_custom"]),
    ("model/gguf-truncated", "gguf", ["could not load", "gguf"]),
    ("model/nan-weights", "nan", ["loss is nan at step 0", "model"]),
    ("model/chat-template-that-loops", "template", ["chat template", "template_s"]),
    ("adapter/pickled-bin", "pickled_adapter", ["could not load", "adapter"]),
]
STATE_CASES = [
    ("checkpoint/step-1e12", {"step": 1_000_000_000_000}, ["step 1000000000000", "not a step"]),
    ("checkpoint/step-minus-5", {"step": -5}, ["step -5"]),
    ("checkpoint/step-of-another-folder", {"step": 2}, ["step 2", "step-1"]),
    ("checkpoint/curve-missing", {"curves": {"eval": []}}, ["'train' curve"]),
    ("checkpoint/examples-seen-tampered", {"examples_seen": 10**9}, ["examples seen"]),
    ("checkpoint/tokens-negative", {"tokens": -3}, ["-3 tokens"]),
    ("checkpoint/state-nested-deep", DEEP, ["state.json", "nesting"]),
    ("checkpoint/state-a-list", [], ["state.json", "json object"]),
]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A tiny run stopped after its step-1 checkpoint (its `.partial` folder, checkpoints/step-1)."""
    from trainer import checkpoint as ckpt
    from trainer.config import TrainConfig
    from trainer.loop import train

    folder = tmp_path_factory.mktemp("checkpointed")
    (folder / "d.jsonl").write_text(JSONL)
    save = ckpt.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    ckpt.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(model=str(tiny), dataset=str(folder / "d.jsonl"), max_steps=2, max_length=64,
                              checkpoint_every=1, output_dir=str(folder / "out")), progress=False)
    finally:
        ckpt.save_checkpoint = save
    return folder / "out.partial" / "checkpoints" / "step-1"


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink()
                                         else os.readlink(p) if p.is_symlink() else "dir")
            for p in sorted(folder.rglob("*"))}


def _write(folder: Path, files: dict) -> None:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "TRUNCATED_PARQUET":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(ROWS * 50), path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif content == "TRUNCATED_STORE":
            path.write_bytes(b"SQLite format 3\x00" + b"\x10\x00\x01\x01")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _run(folder: Path, argv, monkeypatch, capsys, env: dict, tiny: Path) -> tuple[int, str]:
    from flows.cli import main

    monkeypatch.chdir(folder)
    caches = {"LOWREGRET_CACHE": str(folder.parent / f"{folder.name}-cache")}  # outside: a cache may fill
    for key, value in {"HOME": str(folder), "PREFECT_HOME": str(folder / ".prefect"), **caches, **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    capsys.readouterr()
    code = main([a.replace("{M}", str(tiny)) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _assert_refused(code: int, output: str, words, before: dict, folder: Path) -> None:
    assert code == 2, output[-2000:]
    lines = [line for line in output.splitlines() if ": error: " in line]
    assert len(lines) == 1, output[-2000:]
    assert all(w.lower() in lines[0].lower() for w in words), lines[0]
    assert len(lines[0]) < 2000, len(lines[0])  # one paragraph, not an expanded bomb
    assert "Traceback" not in output
    assert _snapshot(folder) == before, "a refused command changed its folder"


@pytest.mark.parametrize("name, files, argv, words, env", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_file_is_refused_in_one_paragraph_and_writes_nothing(name, files, argv, words, env, tmp_path,
                                                                         monkeypatch, capsys, tiny):
    _write(tmp_path, files)
    before = _snapshot(tmp_path)
    code, output = _run(tmp_path, argv, monkeypatch, capsys, env, tiny)
    _assert_refused(code, output, words, before, tmp_path)
    assert not (tmp_path / "PWNED").exists()


def _damaged_model(kind: str, tiny: Path, folder: Path) -> tuple[str, ...]:
    """The command line of a MODEL_CASES case, its damaged files written under `folder`."""
    (folder / "d.jsonl").write_text(JSONL)
    train = ("train", "dataset=d.jsonl", "max_steps=1", "max_length=64", "output_dir=out")
    if kind == "gguf":
        (folder / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(200)))
        return (*train, "model=m.gguf")
    model = folder / "m"
    shutil.copytree(tiny, model)
    weights = next(model.glob("*.safetensors"))
    if kind == "header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b'{"x": {"dtype": "F32", "shape": [9'
        weights.write_bytes(bytes(data))
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif kind == "config":
        (model / "config.json").write_text("{truncated")
    elif kind == "auto_map":
        config = json.loads((model / "config.json").read_text())
        config |= {"model_type": "my_custom", "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}
        (model / "config.json").write_text(json.dumps(config))
        (model / "modeling_x.py").write_text("open('PWNED', 'w').close()\n")
    elif kind == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        save_file({k: v.fill_(float("nan")) for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    elif kind == "template":  # two nested loops: hours of rendering and gigabytes of text
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        for extra in model.glob("chat_template.*"):
            extra.unlink()
        (folder / "d.jsonl").write_text(conversation(4).splitlines()[0] + "\n")
        return ("plan", "--model", str(model), "--rank", "4", "--dataset", "d.jsonl")
    elif kind == "pickled_adapter":
        adapter = folder / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "base_model_name_or_path": str(tiny), "r": 2, "lora_alpha": 4,
            "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
        (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
        return ("evaluate", "--model", str(tiny), "--adapter", str(adapter), "--dataset", "d.jsonl")
    return (*train, f"model={model}")


@pytest.mark.parametrize("name, kind, words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_a_damaged_model_file_is_refused_in_one_paragraph(name, kind, words, tmp_path, monkeypatch, capsys, tiny):
    argv = _damaged_model(kind, tiny, tmp_path)
    before = _snapshot(tmp_path)
    code, output = _run(tmp_path, argv, monkeypatch, capsys, {}, tiny)
    _assert_refused(code, output, words, before, tmp_path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name, change, words", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_a_tampered_checkpoint_is_refused_before_it_resumes(name, change, words, tmp_path, monkeypatch, capsys,
                                                          tiny, checkpoint):
    copy = tmp_path / "out.partial" / "checkpoints" / "step-1"
    shutil.copytree(checkpoint, copy)
    state = json.loads((copy / "state.json").read_text())
    if isinstance(change, dict):
        text = json.dumps(state | change)
    else:
        text = change if isinstance(change, str) else json.dumps(change)
    (copy / "state.json").write_text(text)
    before = _snapshot(tmp_path)
    # The checkpoint's own options (its config hash must match, so that the state checks are reached).
    argv = ("train", f"model={tiny}", f"dataset={checkpoint.parents[2] / 'd.jsonl'}", "max_steps=2", "max_length=64",
            "checkpoint_every=1", "output_dir=out", "resume=auto")
    code, output = _run(tmp_path, argv, monkeypatch, capsys, {}, tiny)
    _assert_refused(code, output, words, before, tmp_path)


def test_output_links_are_refused_and_a_retry_of_a_finished_run_is_done(tmp_path, monkeypatch, capsys, tiny):
    (tmp_path / "d.jsonl").write_text(JSONL)
    (tmp_path / "real").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    train = ("train", f"model={tiny}", "dataset=d.jsonl", "max_steps=2", "max_length=64")
    for argv, words in (((*train, "output_dir=dangling"), ["dangling symbolic link"]),
                        ((*train, "output_dir=linked", "overwrite=true"), ["symbolic link", "real"])):
        before = _snapshot(tmp_path)
        code, output = _run(tmp_path, argv, monkeypatch, capsys, {}, tiny)
        _assert_refused(code, output, words, before, tmp_path)

    # A retry loop's second call (same command, resume=auto) after the run finished: done, exit 0.
    command = (*train, "output_dir=out", "resume=auto")
    assert _run(tmp_path, command, monkeypatch, capsys, {}, tiny)[0] == 0
    finished = _snapshot(tmp_path)
    code, output = _run(tmp_path, command, monkeypatch, capsys, {}, tiny)
    assert code == 0 and "already finished" in output, output[-2000:]
    assert _snapshot(tmp_path) == finished
    code, output = _run(tmp_path, (*command[:-1], "max_steps=3", "resume=auto"), monkeypatch, capsys, {}, tiny)
    assert code == 2 and "already exists" in output  # another config is not a retry


def test_every_case_class_of_the_table_is_counted():
    """The table holds at least 60 cases beyond tests/flows/test_bad_inputs.py's 45."""
    assert len(CASES) + len(MODEL_CASES) + len(STATE_CASES) + 3 >= 60
