"""The statistics (numpy, scipy, no torch): verdicts with their error rates, seed-aware tuning, a factor's answer."""
