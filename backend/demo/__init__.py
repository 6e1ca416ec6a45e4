"""A small Stable-Diffusion-architecture model trained on procedural shapes, and a drag benchmark
with exactly known correct results (issue #5)."""

from pathlib import Path

# The trained demo model that ships with the project (diffusers folder with its preset.json).
MODEL_DIR = Path(__file__).resolve().parent / "model"
