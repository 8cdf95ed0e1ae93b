"""Planning a training run before it starts: compute-optimal size and tokens (Chinchilla, Kaplan), memory per GPU
under each shipped strategy, and wall-clock time (`moe plan`); and checking a plan on a ladder of small runs, scaling
laws fitted to their losses (`moe ladder`, moe/planning/ladder.py)."""

from moe.planning.plan import Plan, load_model_config, make_plan

__all__ = ["Plan", "load_model_config", "make_plan"]
