"""One evaluation run: the Hydra entry point, building the method from its config, the result store, run
fingerprints, sweep callbacks and data parallelism."""
