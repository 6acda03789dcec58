"""Evaluation side of the harness, one subpackage per subsystem:

- ``eval.lmms``: the lmms-eval model classes (one per model family), their prompting, the entry-point plugin;
- ``eval.running``: one run (the ``hiprune-eval`` Hydra entry point), building a method from its config, the result
  store, fingerprints, sweep callbacks, data parallelism;
- ``eval.efficiency``: latency / memory / FLOPs benchmark, scoring overhead, roofline, throughput, their tables;
- ``eval.report``: the paper's tables and plots from the store, token-selection overlays, the object-layer probe;
- ``eval.tasks``: the local lmms-eval tasks (YAML, package data).
"""
