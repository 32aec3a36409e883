"""Feature snapshots: the VAE latents and caption embeddings of a bucket snapshot, precomputed once so
training builds neither encoder (`store` is the format; `opensora precompute` writes them)."""
