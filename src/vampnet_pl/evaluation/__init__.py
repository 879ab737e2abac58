"""Evaluation: metrics (torchmetrics), shared scoring, the offline eval app and the training-time callback."""
