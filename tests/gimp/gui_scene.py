"""The GUI test's picture: a shapes scene from the toy model's drag cases, and the settings
that make the trained toy model move it (random weights only make noise)."""

from __future__ import annotations

import json
import sys

import harness
import numpy as np

# The GUI edits a picture of shapes with the project's trained toy model, so the preview and
# the result show a shape moving (random weights only make noise). Toy settings as the
# README's quality table: no LoRA, a larger latent step, GoodDrag's radii scaled to its grid.
# DragDiffusion named (the default method is Inpaint4Drag).
TOY = {"method": "dragdiffusion", "work-size": 128, "lora-steps": 0, "drag-steps": 40,
       "n-inference-steps": 10,
       "latent-lr": 0.1, "timeout": 120, "advanced": json.dumps({"r1": 1, "r2": 3, "beta": 1})}
# The first interactive run: DragDiffusion's dialog with a knob at its default, switched to
# GoodDrag by keyboard; a GoodDrag job long enough to watch its previews, then cancelled. The
# trained toy's tracker puts this scene's handle on its target within ~20 drag steps, so the
# length comes from the work: 256 px and the full 50 DDIM steps (~40 s on one core; at 128 px
# and 10 steps the job is over in ~4 s, before a preview is seen).
FIRST = {**TOY, "work-size": 256, "n-inference-steps": 50, "inversion-strength": -1.0,
         "advanced": json.dumps({"r1": 1, "r2": 3, "beta": 1, "reach_threshold": 0,
                                 "track_per_denoise": 10, "max_track_no_change": 1000})}


def params_module():
    """The plug-in's dragdiff_params (its knob list)."""
    sys.path.insert(0, str(harness.REPO / "gimp_plugin" / "drag-diffusion"))
    import dragdiff_params

    return dragdiff_params


def toy_scene(gimp: harness.GimpChroot) -> dict:
    """A shapes picture from the toy model's drag cases: its file, a selection around the
    swept area and the drag."""
    from PIL import Image

    from backend.demo.shapes import make_cases

    case = make_cases(1, seed=2, size=128)[0]
    path = gimp.work / "gui-scene.png"
    Image.fromarray(case.image).save(path)
    ys, xs = np.nonzero(case.mask)
    x0, y0 = max(0, int(xs.min()) - 4), max(0, int(ys.min()) - 4)
    return {"image": gimp.inside(path), "prompt": case.prompt,
            "selection": [x0, y0, min(128, int(xs.max()) + 5) - x0,
                          min(128, int(ys.max()) + 5) - y0],
            "drags": [[list(h), list(t)] for h, t in zip(case.handles, case.targets,
                                                          strict=True)]}
