"""Sweeps: the YAML spec both backends share (spec), sweeps run by a W&B server (wandb/), and sweeps with
no server on Optuna (optuna/)."""
