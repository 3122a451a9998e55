"""Active learning: which unlabelled cases an expert should label next (``suggest``), pre-annotations in the formats
annotation tools open, corrected labels brought back with checks, round by round (``importer``), and what each
round cost and gained (``report``).

A labelling folder (``--labels DIR``) holds what has been labelled: ``labels.csv`` (one row per case: its name, pixel
hash, label, round) and ``rounds.json`` (per round: cases added, when, from which file). A case is labelled when its
pixels are in the run's own data or in that folder; ``suggest`` never proposes one.
"""
