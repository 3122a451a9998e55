"""Preprocessing saved with runs, MONAI pipelines, augmentation and corruptions."""
