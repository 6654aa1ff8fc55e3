"""Tools over finished runs folders: upload with wandb sync, render reports."""
