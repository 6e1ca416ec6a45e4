"""A small Stable-Diffusion-architecture model trained on procedural shapes, and a drag benchmark
with exactly known correct results (issue #5)."""
