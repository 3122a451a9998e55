"""Slide-level pathology: tile embeddings from a frozen CNN of the model factory (``embed``), attention-based
multiple-instance learning over them (``mil``), and what a slide's prediction is given back as — a heatmap over the
thumbnail, QuPath-readable GeoJSON regions and a report (``outputs``); ``workflow`` drives them over a slide set.

Reading and tiling slides is the data layer's (``lepton.data.readers.slides``, ``lepton.data.readers.tiling``).
"""
