"""Sweeps with no W&B server ("offline sweeps"): the YAML as an Optuna study in a journal file or
PostgreSQL, the agent that trains its trials as offline W&B runs, and what the sweep found."""
