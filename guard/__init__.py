"""erasure-guard: training-free, per-request concept erasure for generative models."""
