"""Evaluation, training and the distributed plumbing they share."""
