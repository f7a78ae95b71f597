"""The study runner: set-up under the plan lock, the worker pool, a trial as a training run (Optuna)."""
