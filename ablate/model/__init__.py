"""The models: the Transformer and its attention, the recurrent baselines (no Optuna, no MLflow)."""
