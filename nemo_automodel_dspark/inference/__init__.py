"""Inference with a trained draft: lossless speculative decoding, evaluation, confidence calibration, scheduling."""
