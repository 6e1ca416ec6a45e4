"""Prepare (protocol 1.2): an edit's LoRA and inversion while the dialog is open.

With the scriptable fake engine (its prepare runs ``prepare=N`` 'lora' steps of ``delay``
seconds): a matching submit joins the prepare, a changed setting or a cancel discards it, and
another client's submit makes it yield within one step. Then the real engine on the random
tiny model: a submit after a prepare finds the LoRA and z_t* cached, and one that joins a
running prepare gives the same pixels as an edit without any prepare.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fixtures_server import FakeEngine, client_for, image, running_server, submit
from limits import fired, safety_net

from protocol import wire
from protocol.client import Client, JobFailed

PIXELS = image()  # 8×6×3


def prepare(client: Client, **kwargs) -> str:
    """A prepare of the fixtures' image for DragDiffusion; keyword arguments override."""
    args = {"image": PIXELS, "width": 8, "height": 6, "channels": 3, "method": "dragdiffusion"}
    args.update(kwargs)
    return client.prepare(**args)


def wait_until(condition, what: str, seconds: float = 20) -> None:
    limit = safety_net(seconds)
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, fired(what, limit)
        time.sleep(0.01)


def events(client: Client, job_id: str) -> list:
    return list(client.events(job_id, timeout=safety_net(30)))


def beating(client: Client, job_id: str) -> tuple[threading.Thread, list]:
    """A thread that keeps ``client`` alive and collects a job's events (a dialog's timer)."""
    seen: list = []
    thread = threading.Thread(target=lambda: seen.extend(events(client, job_id)), daemon=True)
    thread.start()
    return thread, seen


def test_a_matching_submit_joins_the_running_prepare():
    """The submit arrives while the prepare trains: it is running at once, its events carry the
    prepare's progress, and the prepare is not started again (the engine ran it once)."""
    engine = FakeEngine(delay=0.05)
    script = "prepare=12 steps=2"
    with running_server(engine) as server, client_for(server) as client:
        prep = prepare(client, prompt=script)
        wait_until(lambda: engine.prepares, "the prepare to start")
        job = submit(client, prompt=script)
        reply = client.last_submit
        assert reply["joined"] == prep and reply["state"] == "running"
        seen = events(client, job)
        prepared = events(client, prep)
    assert seen[0].type == "started" and seen[-1].type == "finished"
    lora = [e["step"] for e in seen if e.type == "progress" and e["phase"] == "lora"]
    assert lora and lora[-1] == 11  # the prepare's steps, reported as the submit's
    assert prepared[-1].type == "prepared" and prepared[-1]["timings"]["lora"] > 0
    assert len(engine.prepares) == len(engine.prepared) == len(engine.runs) == 1
    assert engine.calls == [f"prepare {script}", f"run {script}"]


def test_a_submit_that_matches_a_waiting_prepare_supersedes_it():
    """A prepare still waiting behind another client's edit is dropped when its submit comes:
    the edit does that work itself."""
    engine = FakeEngine(delay=0.05)
    with running_server(engine) as server, client_for(server) as busy, \
            client_for(server) as client:
        other = submit(busy, prompt="steps=10")
        wait_until(lambda: engine.runs, "the other client's edit to start")
        prep = prepare(client, prompt="prepare=5")
        job = submit(client, prompt="prepare=5")
        assert client.last_submit["joined"] is None
        assert events(client, prep)[-1]["reason"] == "superseded"
        assert events(client, job)[-1].type == "finished"
        assert events(busy, other)[-1].type == "finished"
    assert engine.prepares == []


def test_a_changed_setting_replaces_the_prepare_and_an_unchanged_one_is_a_duplicate():
    engine = FakeEngine(delay=0.05)
    with running_server(engine) as server, client_for(server) as client:
        first = prepare(client, prompt="prepare=200", params={"lora_steps": 20})
        wait_until(lambda: engine.prepares, "the prepare to start")
        # drag_steps keys neither the LoRA nor the inversion: the same prepare
        assert prepare(client, prompt="prepare=200",
                       params={"lora_steps": 20, "drag_steps": 7}) == first
        second = prepare(client, prompt="prepare=3", params={"lora_steps": 30})
        assert second != first
        assert events(client, first)[-1]["reason"] == "replaced"
        assert events(client, second)[-1].type == "prepared"
        # the dialog's OK with yet other settings: the prepare of the old ones is discarded
        third = prepare(client, prompt="prepare=200")
        wait_until(lambda: len(engine.prepares) == 3, "the third prepare to start")
        job = submit(client, prompt="steps=2", params={"lora_steps": 40})
        assert client.last_submit["joined"] is None
        assert events(client, third)[-1]["reason"] == "replaced"
        assert events(client, job)[-1].type == "finished"
    assert max(engine.steps_after_cancel) <= 1
    assert len(engine.prepared) == 1 and len(engine.runs) == 1


def test_a_cancelled_dialog_discards_the_prepare():
    engine = FakeEngine(delay=0.05)
    with running_server(engine) as server, client_for(server) as client:
        prep = prepare(client, prompt="prepare=200")
        wait_until(lambda: engine.prepares, "the prepare to start")
        assert client.cancel(prep) == "cancelling"
        assert events(client, prep)[-1]["reason"] == "client"
        assert client.ping()["running"] is None
    assert engine.prepared == [] and engine.steps_after_cancel[0] <= 1


def test_another_clients_submit_is_not_delayed_beyond_one_step():
    """A prepare yields to any other edit within one step (the fake engine's cancel check), and
    starts over once the queue is empty; an edit never waits behind a waiting prepare."""
    engine = FakeEngine(delay=0.05)
    with running_server(engine) as server, client_for(server) as dialog, \
            client_for(server) as other:
        prep = prepare(dialog, prompt="prepare=20")
        beat, seen = beating(dialog, prep)  # the dialog stays open meanwhile
        wait_until(lambda: engine.prepares, "the prepare to start")
        job = submit(other, prompt="steps=3")
        assert other.last_submit["joined"] is None
        assert events(other, job)[-1].type == "finished"
        beat.join(safety_net(30))
    assert engine.steps_after_cancel[0] <= 1  # the prepare stopped within one step
    assert engine.calls == ["prepare prepare=20", "run steps=3", "prepare prepare=20"]
    types = [e.type for e in seen]
    assert "queued" in types[types.index("started"):] and types[-1] == "prepared"
    assert len(engine.prepared) == 1


def test_a_prepare_waits_while_edits_are_queued():
    engine = FakeEngine(delay=0.05)
    with running_server(engine) as server, client_for(server) as dialog, \
            client_for(server) as other:
        first = submit(other, prompt="steps=4 a")
        wait_until(lambda: engine.runs, "the first edit to start")
        prep = prepare(dialog, prompt="prepare=2")
        beat, seen = beating(dialog, prep)
        second = submit(other, prompt="steps=4 b")
        for job in (first, second):
            assert events(other, job)[-1].type == "finished"
        beat.join(safety_net(30))
    assert engine.calls == ["run steps=4 a", "run steps=4 b", "prepare prepare=2"]
    assert seen[-1].type == "prepared"


def test_a_prepare_is_checked_and_counted_like_a_submit():
    engine = FakeEngine(delay=0.05)
    with running_server(engine, limits=wire.Limits(max_side=16, max_queue=1)) as server, \
            client_for(server) as client, client_for(server) as other:
        with pytest.raises(JobFailed) as err:  # size-capped
            prepare(client, image=bytes(20 * 6 * 3), width=20)
        assert err.value.code == wire.INVALID_INPUT and "per side" in err.value.message
        with pytest.raises(JobFailed) as err:  # knob ranges
            prepare(client, params={"lora_steps": -1})
        assert err.value.code == wire.INVALID_INPUT and "lora_steps" in err.value.message
        with pytest.raises(JobFailed) as err:  # the cost check on the image's working canvas
            prepare(client, image=bytes(16 * 1 * 3), width=16, height=1,
                    params={"work_size": 2048, "lora_steps": 2000, "lora_batch": 16})
        assert err.value.code == wire.INVALID_INPUT and "UNet passes" in err.value.message
        busy = submit(other, prompt="steps=100")
        wait_until(lambda: engine.runs, "the edit to start")
        waiting = prepare(client)
        with pytest.raises(JobFailed) as err:  # a prepare takes no edit's place...
            prepare(other)
        assert err.value.code == wire.QUEUE_FULL
        job = submit(client, image=image(6, 6), width=6, height=6)  # ...but an edit may wait
        other.cancel(busy)
        assert events(client, waiting)[-1]["reason"] == "replaced"  # its own session's edit
        assert events(client, job)[-1].type == "finished"


def test_a_silent_dialogs_prepare_is_cancelled():
    engine = FakeEngine(delay=0.05)
    with running_server(engine, client_ttl=0.5) as server, client_for(server) as watcher:
        with client_for(server) as client:
            prep = prepare(client, prompt="prepare=1000")
        wait_until(lambda: engine.prepares, "the prepare to start")
        assert events(watcher, prep)[-1]["reason"] == "client_gone"


def test_shutdown_cancels_a_joined_submit_and_its_prepare():
    engine = FakeEngine(delay=0.05)
    with running_server(engine) as server, client_for(server) as client:
        prep = prepare(client, prompt="prepare=1000")
        wait_until(lambda: engine.prepares, "the prepare to start")
        job = submit(client, prompt="prepare=1000")
        assert client.last_submit["joined"] == prep
        cancelled = client.shutdown()
        assert set(cancelled) == {prep, job}
        assert events(client, job)[-1]["reason"] == "shutdown"


def test_cancelling_a_joined_submit_stops_its_own_prepare():
    engine = FakeEngine(delay=0.05)
    with running_server(engine) as server, client_for(server) as client:
        prep = prepare(client, prompt="prepare=1000")
        wait_until(lambda: engine.prepares, "the prepare to start")
        job = submit(client, prompt="prepare=1000")
        assert client.cancel(prep) == "running"  # the submit's work now: left alone
        assert client.cancel(job) == "cancelled"
        assert events(client, job)[-1]["reason"] == "client"
        assert events(client, prep)[-1]["reason"] == "client"
        assert client.ping()["running"] is None
    assert engine.runs == []


# --- the real engine on the random tiny model ----------------------------------------------------

TINY = {"work_size": 64, "lora_steps": 30, "lora_batch": 2, "n_inference_steps": 10,
        "drag_steps": 3, "reach_threshold": 0.0}


@pytest.fixture
def tiny_engine(tiny_model_dir, tmp_path):
    import torch

    from backend.engine.pipeline import DragEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit comparisons (conftest.one_thread)
    yield lambda: DragEngine.load(str(tiny_model_dir), device="cpu",
                                  lora_cache_dir=str(tmp_path / f"lora-{time.monotonic_ns()}"))
    torch.set_num_threads(threads)


def tiny_case() -> dict:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[8:40, 10:56] = 255
    return {"image": pixels, "width": 64, "height": 48, "channels": 3, "mask": mask,
            "handles": [(20, 25)], "targets": [(40, 25)], "method": "dragdiffusion",
            "params": TINY, "prompt": "a red disc", "seed": 3}


def finished(client: Client, job: str):
    last = events(client, job)[-1]
    assert last.type == "finished", last.content
    return last


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_the_real_engine_starts_a_prepared_edit_at_the_drag(tiny_engine, method):
    case = {**tiny_case(), "method": method}
    with running_server(tiny_engine()) as server, client_for(server) as client:
        prep = client.prepare(case["image"], 64, 48, 3, method=method, params=TINY,
                              prompt=case["prompt"], seed=3)
        done = events(client, prep)[-1]
        assert done.type == "prepared" and done["stats"]["work"]["fe"]["lora"] > 0
        result = finished(client, client.submit(**case))
    stats = result["stats"]
    assert stats["reused"] == {"lora": True, "inversion": True}
    fe = stats["work"]["fe"]
    assert fe["lora"] == fe["inversion"] == fe["reference"] == 0 and fe["drag"] > 0


def test_the_real_engine_joined_gives_the_same_pixels_as_no_prepare(tiny_engine):
    case = tiny_case()
    with running_server(tiny_engine()) as server, client_for(server) as client:
        plain = finished(client, client.submit(**case))
    with running_server(tiny_engine()) as server, client_for(server) as client:
        prep = client.prepare(case["image"], 64, 48, 3, method="dragdiffusion", params=TINY,
                              prompt=case["prompt"], seed=3)
        seen: list = []
        for event in client.events(prep, timeout=safety_net(60)):  # until it trains
            seen.append(event)
            if event.type == "progress" and event["phase"] == "lora" and event["step"] >= 2:
                break
        job = client.submit(**case)
        assert client.last_submit["joined"] == prep, seen[-1].content
        joined = finished(client, job)
    assert joined["stats"]["work"]["fe"]["lora"] == 0  # trained by the prepare
    assert joined.image == plain.image
