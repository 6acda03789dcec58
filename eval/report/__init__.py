"""Reports: the paper's tables reproduced from the result store, the paper's numbers, plots, token-selection
overlays, the object-layer probe and the plain store table."""
