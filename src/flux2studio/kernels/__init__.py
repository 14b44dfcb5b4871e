"""Compiled CPU kernels for what PyTorch does slowly on CPUs (built on first use, optional)."""

# How a pipeline runs attention: "auto" (our kernel where it runs, else PyTorch's), "sdpa", "kernel".
ATTENTION_MODES = ("auto", "sdpa", "kernel")
