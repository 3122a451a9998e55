"""Generators that write real file formats for demos, tests and benchmarks."""
