"""Inference: sampling and decoding over a trunk (and, later, the K-stream orchestrator)."""
