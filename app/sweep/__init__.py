"""Sweeps: the YAML spec, W&B sweep create/validate, the duplicate guard, and offline sweeps on Optuna."""
