"""Tuned kernels exposed as PyTorch custom ops (torch.ops.shapetune.*)."""
