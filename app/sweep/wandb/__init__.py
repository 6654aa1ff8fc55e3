"""Sweeps run by a W&B server: create one from a YAML, the warm agent, and the guard that skips a run
whose parameters another agent already has."""
