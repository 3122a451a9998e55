"""The case index and the on-disk case cache: sources, layouts, splits, cases."""
