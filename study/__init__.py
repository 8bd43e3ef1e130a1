"""The study: the planner's predictions (capacity verdict, smallest low-regret rank, LR advice)
tested against real runs, and the calibration file the planner reads (docs/STUDY.md).

Layering: `study` sits beside `evaluation`: it imports planner, trainer and evaluation, never
flows, Prefect or MLflow; `flows/study.py` runs its designs through the sweep flow's task.
"""
