"""Planning a training run before it starts: compute-optimal size and tokens (Chinchilla, Kaplan), memory per GPU
under each shipped strategy, and wall-clock time; `moe plan` on the command line."""

from moe.planning.plan import Plan, load_model_config, make_plan

__all__ = ["Plan", "load_model_config", "make_plan"]
