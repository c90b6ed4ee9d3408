"""Scripts that run on the GPU host with its own Python (stdlib only unless noted)."""
