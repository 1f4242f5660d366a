"""Optuna sweeps over an experiment's search space: the study driver, one trial's process, the study report."""
