"""Training: warmup and cosine decay, the run protocol (evaluation, divergence, callbacks) and trials of one
architecture trained as one stacked model. No Optuna."""
