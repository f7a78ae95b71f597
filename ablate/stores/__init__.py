"""Where results live: Optuna's RDB storage (schema races, the plan lock), outages waited out, MLflow tracking (a
run's per-step logging, the study's parent and child runs)."""
