"""Evaluation side of the harness: lmms-eval plugin, Hydra run entry point, result store, tables."""
