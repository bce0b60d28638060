"""Trainer-side scoring: trainer logprobs, and the logits capture (with its Triton path).
"""
