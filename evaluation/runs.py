"""One record of a finished run, supervised or RL, and one check that two sets of runs compare.

`lowregret compare` (evaluation/compare.py: held-out NLL) and `lowregret rl-compare`
(evaluation/rl.py: held-out reward) both read runs with `load_run` and refuse what is not a
LoRA-vs-FullFT comparison with `check_comparable`; their paired statistics then read
`RunRecord.scores`, each run's per-example held-out scores at every evaluated step, from the one
score file both trainers write (`trainer.result.EVAL_SCORES_FILE`): summed NLL weighted by
completion tokens (supervised) or reward, one per prompt (RL).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from data.errors import UserError
from data.guard import read_json
from trainer.result import EVAL_SCORES_FILE, RL, SCORE_OF, SUPERVISED


@dataclass(frozen=True)
class Objective:
    """What differs between a supervised and an RL run's records."""

    unit: str  # what the held-out scores are of: "examples" or "prompts"
    score: str  # what is compared: "losses" or "rewards"
    same: tuple[tuple[str, str], ...]  # config keys both runs must share, and what they are
    command: str  # what re-creates a run


OBJECTIVES = {
    SUPERVISED: Objective("examples", "losses", (("model", "base models"),), "lowregret train"),
    RL: Objective("prompts", "rewards",
                  (("model", "base models"), ("reward", "rewards"), ("max_new_tokens", "completion lengths")),
                  "lowregret rl-train"),
}


@dataclass(frozen=True)
class HeldOutScores:
    """Per-example held-out scores: `by_step[step][i]` is example i's summed NLL (nats) or reward."""

    ids: list[str]
    weights: list[float]  # completion tokens per example (supervised); 1 per prompt (RL)
    by_step: dict[int, list[float]]


@dataclass(frozen=True)
class RunRecord:
    """A finished run read from its output directory: summary.json, curves.json, and its per-example
    held-out scores (read when first asked for)."""

    path: Path
    summary: dict
    curves: dict
    objective: str = SUPERVISED

    @property
    def config(self) -> dict:
        return self.summary.get("config") or {}

    def get(self, name: str):
        """A result field, from summary.json's top level or its "result" object."""
        if name in self.summary:
            return self.summary[name]
        return (self.summary.get("result") or {}).get(name)

    @property
    def method(self) -> str | None:
        return self.get("method") or self.config.get("method")

    @functools.cached_property
    def scores(self) -> HeldOutScores:
        """The run's per-example held-out scores.

        Raises:
            UserError: the file is missing (a run from before per-example scores were kept) or bad.
        """
        objective = OBJECTIVES[self.objective]
        path = self.path / EVAL_SCORES_FILE
        if not path.is_file():
            raise UserError(
                f"{self.path} has no {EVAL_SCORES_FILE} (per-example held-out scores), so no interval can be "
                f"computed: it was trained by an older LowRegret. Re-train it with `{objective.command}`."
            )
        fix = f"re-train the run (`{objective.command}`)."
        record = read_json(path, fix)
        try:
            kind, ids, by_step = record["objective"], record["ids"], record["by_step"]
            if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
                raise TypeError("ids must be a list of strings")
            weights = [_number(w) for w in record["weights"]]
            by_step = {_whole(step): [_number(v) for v in values] for step, values in by_step}
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is not a per-example score file ({str(exc)[:120]}): {fix}") from None
        if kind != self.objective:
            raise UserError(f"{self.path} is a {kind!r} run ({SCORE_OF.get(kind, kind)} scores), not a "
                            f"{self.objective!r} one: compare it with `lowregret "
                            f"{'rl-compare' if kind == RL else 'compare'}`.")
        if not by_step or any(len(values) != len(ids) for values in by_step.values()) or len(weights) != len(ids):
            raise UserError(f"{path} is inconsistent (example counts differ); re-train the run (`{objective.command}`).")
        if self.objective == RL and 0 not in by_step:
            raise UserError(f"{path} is inconsistent (no step 0, the base model's rewards); re-run "
                            f"`{objective.command}`.")
        return HeldOutScores(ids, weights, by_step)


def load_run(run_dir: str | Path, objective: str = SUPERVISED) -> RunRecord:
    """Read a finished run's output directory.

    Raises:
        UserError: the directory or one of its files is missing or unreadable (a supervised run:
            summary.json, curves.json; an RL run: those and eval_scores.json, checked at once).
    """
    from evaluation.curves import load_curves

    run_dir = Path(run_dir)
    if objective == RL:
        files = {name: run_dir / name for name in ("summary.json", "curves.json", EVAL_SCORES_FILE)}
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            raise UserError(f"{run_dir} is not a finished RL run (no {', '.join(missing)}): pass the output_dir of "
                            "`lowregret rl-train` after it completed.")
        fix = "re-run `lowregret rl-train`."
        summary, curves = (read_json(files[name], fix) for name in ("summary.json", "curves.json"))
        if not isinstance(summary, dict):
            raise UserError(f"{files['summary.json']} should hold a JSON object: {fix}")
        _check_rl_curves(curves, files["curves.json"], fix)
        run = RunRecord(run_dir, summary, curves, RL)
        run.scores  # noqa: B018 - an RL run is checked whole when read
        return run
    if not run_dir.is_dir():
        raise UserError(f"Run directory {run_dir} not found: pass the trainer's output_dir.")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(
            f"{run_dir} has no summary.json, so it is not a finished training run (the trainer "
            "writes it last). Pass the run's output_dir after `lowregret train` has completed."
        )
    summary = read_json(summary_path, "re-run the trainer.")
    if not isinstance(summary, dict):
        raise UserError(f"{summary_path} should hold a JSON object; re-run the trainer.")
    curves_path = run_dir / "curves.json"
    if not curves_path.is_file():
        raise UserError(f"{run_dir} has summary.json but no curves.json; re-run the trainer.")
    return RunRecord(path=run_dir, summary=summary, curves=load_curves(curves_path))


@dataclass(frozen=True)
class HeldOutLosses:
    """The paired per-example scores of a comparison, as losses: each held-out example's weight
    (completion tokens; 1 per RL prompt) and final summed NLL in nats (RL: minus the reward) of each
    LoRA and FullFT run (seed replicates as rows, paired by seed), and the base model's (step 0)."""

    tokens: tuple[float, ...]
    lora: tuple[tuple[float, ...], ...]
    full: tuple[tuple[float, ...], ...]
    base: tuple[float, ...] | None = None


def paired_losses(lora: list[RunRecord], full: list[RunRecord]
                  ) -> tuple[HeldOutLosses, list[RunRecord], list[RunRecord]]:
    """The one pairing of `compare` and `rl-compare`: the runs sorted by seed, checked
    (`check_comparable`), and their final per-example scores (a reward is a negative loss, so one
    statistic, `evaluation.regret.regret_interval`, serves both: regret > 0 means LoRA trails), with
    the base model's from the first FullFT run's step 0. Returns them with the sorted runs.

    Raises:
        UserError: `check_comparable` refuses the runs.
    """
    lora = sorted(lora, key=lambda r: r.config.get("seed") or 0)
    full = sorted(full, key=lambda r: r.config.get("seed") or 0)
    check_comparable(lora, full)
    sign = -1.0 if lora[0].objective == RL else 1.0

    def final(run: RunRecord) -> tuple[float, ...]:
        by_step = run.scores.by_step
        return tuple(sign * v for v in by_step[max(by_step)])

    first = full[0].scores.by_step
    base = tuple(sign * v for v in first[0]) if 0 in first else None
    return (HeldOutLosses(tuple(lora[0].scores.weights), tuple(map(final, lora)), tuple(map(final, full)), base),
            lora, full)


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r:.40} is not a number")
    return float(value)


def _whole(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"step {value!r:.40} is not a whole number")
    return value


def _check_rl_curves(curves, path: Path, fix: str) -> None:
    """An RL curves.json: {name: [[step, value], ...]} (train_reward, signal_fraction, eval_reward, ...)."""
    ok = isinstance(curves, dict) and all(
        isinstance(points, list) and all(isinstance(p, list) and len(p) == 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in p) for p in points)
        for points in curves.values())
    if not ok:
        raise UserError(f"{path} is not an RL curves record ({{name: [[step, value], ...]}}): {fix}")


def check_comparable(lora: list[RunRecord], full: list[RunRecord]) -> None:
    """Refuse what is not a LoRA-vs-FullFT comparison on one held-out set (supervised or RL alike).

    Raises:
        UserError: a run given twice; a FullFT run among the LoRA runs or the reverse; unequal
            numbers of runs or seeds that do not pair up; different base models (RL: rewards,
            completion lengths), training data (data fingerprint) or held-out examples.
    """
    runs = lora + full
    objective = OBJECTIVES[runs[0].objective]
    resolved = [r.path.resolve() for r in runs]
    if len(set(resolved)) < len(resolved):
        twice = next(p for p in resolved if resolved.count(p) > 1)
        raise UserError(f"{twice} is given twice: a run compared with itself has no regret. Pass a LoRA run "
                        "and a FullFT run trained on the same data.")
    for flag, wanted, group in (("--lora", "lora", lora), ("--full", "full", full)):
        for run in group:
            if run.method != wanted:
                raise UserError(
                    f"{flag} {run.path} is a {run.method!r} run, not a {wanted!r} run: the comparison needs LoRA runs "
                    "as --lora and FullFT runs as --full (two runs of one method measure noise, not regret; "
                    "use seed replicates for that).")
    if len(lora) != len(full):
        raise UserError(f"{len(lora)} LoRA runs but {len(full)} FullFT runs: give one FullFT run per LoRA seed.")
    lora_seeds, full_seeds = [r.config.get("seed") for r in lora], [r.config.get("seed") for r in full]
    if len(lora) > 1 and (len(set(lora_seeds)) < len(lora) or sorted(lora_seeds) != sorted(full_seeds)):
        raise UserError(f"Seed replicates must pair up: LoRA seeds {lora_seeds}, FullFT seeds {full_seeds}. "
                        "Give each seed once per method.")
    first = runs[0]
    for run in runs[1:]:
        for key, what in objective.same:
            if run.config.get(key) != first.config.get(key):
                raise UserError(f"{run.path} and {first.path} use different {what} ({run.config.get(key)!r} vs "
                                f"{first.config.get(key)!r}): their {objective.score} do not compare. Train both "
                                "with the same setting.")
        if run.get("data_fingerprint") != first.get("data_fingerprint"):
            raise UserError(
                f"{run.path} and {first.path} were trained on different data (data fingerprints "
                f"{run.get('data_fingerprint')} vs {first.get('data_fingerprint')}): train both on the same "
                "dataset, limit and held-out split (split_seed).")
        if run.scores.ids != first.scores.ids:
            raise UserError(
                f"{run.path} and {first.path} were scored on different held-out {objective.unit}: a paired comparison "
                "needs the same ones. Give the runs the same eval_dataset (or dataset, eval_fraction, split_seed), "
                "max_length and eval_max_examples.")
