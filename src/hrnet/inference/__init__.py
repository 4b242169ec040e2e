"""Inference: classify files, evaluate on a labelled folder (also under torchrun), explain with Grad-CAM."""
