"""Optimisation and training loops."""
