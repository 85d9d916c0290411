"""Datasets, image loading and the transforms of the official recipes."""
