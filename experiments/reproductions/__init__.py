"""Claim files for `python -m experiments.reproduce` (one published result each)."""
