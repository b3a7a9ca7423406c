"""Design-space exploration with Optuna: search space as data, objective, study driver."""
