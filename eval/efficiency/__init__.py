"""Efficiency: the latency/memory/FLOPs benchmark, scoring overhead, roofline, FLOP counts, evaluation throughput,
their tables, and the measurement helpers they share."""
