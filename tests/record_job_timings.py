"""Record one real edit's progress timeline, the fixture the time-left test replays.

    OMP_NUM_THREADS=1 .venv/bin/python tests/record_job_timings.py [METHOD] [OUT.json]

Runs a first edit (LoRA trained, nothing cached) on the shipped demo model on the CPU with
the bench's synthetic case at 128 px, and writes every progress event as the engine reports it
(phase, step, total, seconds since the edit started) plus the end, and the method's resolved
parameters (what the plug-in plans from). ``tests/test_plugin_progress.py`` replays it through
the plug-in's ``Tracker`` and bounds the estimate's error over the whole job.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from backend.engine.pipeline import DragEngine  # noqa: E402
from backend.engine.types import DragRequest  # noqa: E402
from backend.tools.bench import synthetic_case  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "backend" / "demo" / "model"


def record(method: str) -> dict:
    engine = DragEngine.load(str(DEMO), device="cpu", lora_cache_dir=tempfile.mkdtemp())
    size = 128
    image, mask, handles, targets = synthetic_case(size)
    algorithm, params = engine.table.resolve(method, {}, (size, size))
    request = DragRequest(image=image, handles=handles, targets=targets, mask=mask,
                          method=method, prompt="a red disc", seed=0, params={})
    events: list[list] = []
    start = time.monotonic()

    def progress(phase: str, step: int, total: int) -> None:
        events.append([phase, step, total, round(time.monotonic() - start, 4)])

    result = engine.run(request, progress=progress)
    end = round(time.monotonic() - start, 4)
    return {"method": method, "model": "backend/demo/model", "device": "cpu", "size": size,
            "params": {**params.as_dict(), "method": algorithm}, "events": events, "end": end,
            "fe": result.stats["work"]["fe"], "drag_steps": result.stats.get("drag_steps")}


if __name__ == "__main__":
    method = sys.argv[1] if len(sys.argv) > 1 else "dragdiffusion"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else
               Path(__file__).parent / "data" / f"job_timings_{method}_demo.json")
    timeline = record(method)
    out.write_text(json.dumps(timeline, separators=(",", ":")) + "\n")
    print(f"{out}: {len(timeline['events'])} events, {timeline['end']} s, fe {timeline['fe']}")
