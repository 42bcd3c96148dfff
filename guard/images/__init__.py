"""The image request path: a policy installed on a diffusers Stable Diffusion pipeline."""
