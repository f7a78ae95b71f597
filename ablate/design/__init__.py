"""A study's design, before any store or torch: the study file as written, the validated spec, families and
budgets, the checks before any work, which trials come next, and what a trial that ended without a result becomes."""
