"""The ground floor: names of every tag, attribute and status; the run config and its one parser; model sizes
(parameters, FLOPs, compute budgets); store URLs; devices; interrupts; the adapter for Optuna's private parts."""
