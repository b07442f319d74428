"""Experiments that compare the adaptation methods."""
