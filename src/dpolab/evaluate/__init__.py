"""Evaluation: preference metrics on held-out pairs, base-vs-tuned generations, optional judge, the report."""
