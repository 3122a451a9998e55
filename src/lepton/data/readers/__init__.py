"""Readers: each input format into frames, volumes, masks, boxes or sequences."""
