"""Hyper-parameter sweeps (`tlsan tune`): search space, study, workers, objective, plots.

Modules, each with one job: `space` (YAML search space + validation), `storage` (storage URL →
Optuna storage), `study` (sampler, pruner, study identity), `workers` (the exact-N trial loop,
heartbeats), `objective` (one trial = one `fit` on train/valid), `mlflow_study` (parent and
nested runs), `plots` (study plots as PNG), `sweep` (one `tlsan tune` invocation).
Optuna, MLflow and torch are imported inside functions so `import tlsan.tuning` stays cheap.
"""
