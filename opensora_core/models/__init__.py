"""Diffusion models, VAEs and text encoders, built by config `type` through `opensora_core.models.registry`."""
