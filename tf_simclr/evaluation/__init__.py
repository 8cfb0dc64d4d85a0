"""The training loop, per-mode tasks and evaluation."""
