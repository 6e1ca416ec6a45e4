"""The server over real loopback sockets, with a scriptable fake engine."""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time

import numpy as np
import pytest
from fixtures_server import (
    TRANSPORTS,
    FakeEngine,
    RawPeer,
    client_for,
    image,
    running_server,
    submit,
)

from backend.engine.errors import ModelNotFound
from backend.engine.params import MethodTable, method_descriptions, spec_table
from backend.engine.types import DEFAULT_METHOD, DragResult
from backend.server import engine_worker
from backend.server.endpoint import ServerError
from backend.server.jobs import FairQueue, Job, JobTable, RanIds, Terminal
from backend.server.server import Server
from protocol import connection, wire
from protocol.client import (
    BackendUnavailable,
    Client,
    IncompatibleVersion,
    JobFailed,
    WrongKey,
)


def collect(client: Client, job_id: str, timeout: float = 30) -> list:
    return list(client.events(job_id, timeout=timeout))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hello_describes_the_backend(transport):
    with running_server(FakeEngine()) as server, client_for(server, transport=transport) as client:
        info = client.hello()
    assert info["protocol_version"] == wire.PROTOCOL_VERSION
    assert info["backend_version"] and info["server_session"]
    assert info["device"] == "cpu" and info["memory"] == {"total": 1 << 30}
    assert info["model"] == {"name": "fake-model", "state": "ready", "error": None}
    assert {"dragdiffusion", "gooddrag"} <= set(info["methods"])
    assert info["methods"]["gooddrag"]["method"] == "gooddrag"
    assert info["limits"] == wire.Limits().as_dict()
    assert info["queue"] == {"queued": 0, "running": None}
    assert info["security"] == {"signature_scheme": "hmac-sha256", "curve": False}


def test_hello_carries_the_parameter_table_and_method_descriptions():
    with running_server(FakeEngine()) as server, client_for(server) as client:
        info = client.hello()
    assert info["parameters"] == spec_table()
    assert info["parameters"]["latent_lr"]["min"] > 0 and info["parameters"]["latent_lr"]["help"]
    assert info["descriptions"] == method_descriptions()
    assert set(info["descriptions"]) == set(info["methods"])


def test_hello_announces_the_engines_own_table():
    """The defaults hello sends are the loaded engine's (its model's preset applied), not the
    bare presets (issue 28: the demo model ran at 128 while hello said 512)."""
    own = MethodTable({"work_size": 128, "reach_threshold": 0.5})
    with running_server(FakeEngine(table=own)) as server, client_for(server) as client:
        info = client.hello()
    assert {k: info[k] for k in own.as_hello()} == own.as_hello()
    assert info["methods"]["gooddrag"]["work_size"] == 128
    assert info["default_method"] == DEFAULT_METHOD


def test_a_submit_without_a_method_runs_the_backends_default():
    """Client.submit names no method of its own: it sends hello's default_method, which the
    engine's table chose (Inpaint4Drag, or the first method an engine without it runs)."""
    for table, expected in ((MethodTable(), DEFAULT_METHOD),
                            (MethodTable(algorithms=("dragdiffusion", "gooddrag")),
                             "dragdiffusion")):
        engine = FakeEngine(table=table)
        with running_server(engine, table=table) as server, client_for(server) as client:
            job = client.submit(image(), 8, 6, 3, [(1, 1)], [(4, 3)])
            assert collect(client, job)[-1].type == "finished"
        assert engine.runs[-1].method == expected


def test_a_submit_the_engine_would_refuse_on_its_canvas_is_refused_before_queueing():
    """1:100 at the default working width asks for ~100 default edits of work: refused in
    the submit's reply, naming the cap that fits; nothing queued, nothing run."""
    engine = FakeEngine()
    with running_server(engine) as server, client_for(server) as client:
        width, height = 40, 4000
        with pytest.raises(JobFailed) as err:
            submit(client, image=image(width, height), width=width, height=height,
                   handles=[(5, 5)], targets=[(9, 9)])
        assert err.value.code == wire.INVALID_INPUT and "work_max_side" in str(err.value)
        assert client.ping()["queued"] == 0
        # the same image with the long side capped as the message says is accepted and runs
        fits = int(re.search(r"at most (\d+)", str(err.value)).group(1))
        job = submit(client, image=image(width, height), width=width, height=height,
                     handles=[(5, 5)], targets=[(9, 9)], params={"work_max_side": fits})
        assert collect(client, job)[-1].type == "finished"
    assert len(engine.runs) == 1


def test_the_engines_table_decides_what_fits():
    """The demo model's working width (128) makes the same tall image fit."""
    engine = FakeEngine(table=MethodTable({"work_size": 128}))
    with running_server(engine) as server, client_for(server) as client:
        width, height = 40, 2000  # 512 wide: 512×25600, too much; 128 wide: 128×6400, fine
        job = submit(client, image=image(width, height), width=width, height=height,
                     handles=[(5, 5)], targets=[(9, 9)])
        assert collect(client, job)[-1].type == "finished"
        with pytest.raises(JobFailed) as err:  # asked for 512 explicitly: refused
            submit(client, image=image(width, height), width=width, height=height,
                   handles=[(5, 5)], targets=[(9, 9)], params={"work_size": 512})
        assert err.value.code == wire.INVALID_INPUT


def test_while_the_model_loads_the_announced_table_is_sent_and_checked():
    gate = threading.Event()
    engine = FakeEngine(table=MethodTable({"work_size": 128}))

    def load():
        gate.wait(10)
        return engine

    announced = MethodTable({"work_size": 128})
    server = Server(load, model_name="slow", bind="tcp://127.0.0.1:0", table=announced)
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with client_for(server) as client:
            info = client.hello()
            assert info["model"]["state"] == "loading"
            assert info["methods"]["dragdiffusion"]["work_size"] == 128
            with pytest.raises(JobFailed) as err:
                submit(client, image=image(40, 2000), width=40, height=2000,
                       params={"work_size": 512})
            assert err.value.code == wire.INVALID_INPUT
            job = submit(client, image=image(40, 2000), width=40, height=2000)
            gate.set()
            assert collect(client, job)[-1].type == "finished"
    finally:
        server.stop()
        thread.join(10)


def test_queued_jobs_are_checked_again_when_the_loaded_model_differs():
    """Announced 128 wide, but the model that loaded runs 512 wide (a fallback that went
    another way): a queued edit that no longer fits ends with invalid_input, not a run."""
    gate = threading.Event()
    engine = FakeEngine()  # the bare presets: 512 wide

    def load():
        gate.wait(10)
        return engine

    server = Server(load, model_name="slow", bind="tcp://127.0.0.1:0",
                    table=MethodTable({"work_size": 128}))
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with client_for(server) as client:
            tall = submit(client, image=image(40, 2000), width=40, height=2000)
            small = submit(client)
            gate.set()
            with pytest.raises(JobFailed) as err:
                collect(client, tall)
            assert err.value.code == wire.INVALID_INPUT
            assert collect(client, small)[-1].type == "finished"
            assert client.hello()["methods"]["dragdiffusion"]["work_size"] == 512
    finally:
        server.stop()
        thread.join(10)
    assert len(engine.runs) == 1


def test_a_queued_job_is_checked_again_with_attentions_cost():
    """The re-check of queued jobs is the same one check as a submit's, the cost counted with
    attention's square of the tokens (N1): announced with work_max_side 4096, the 8×8192 strip
    at work_size 64 is an 8×4096 canvas and is queued; the model that loaded has no cap, so it
    is 64×65,536 (65,536 tokens), which its area alone would let through (~16 edits' work)."""
    gate = threading.Event()
    engine = FakeEngine()  # no cap of its own

    def load():
        gate.wait(10)
        return engine

    server = Server(load, model_name="slow", bind="tcp://127.0.0.1:0",
                    table=MethodTable({"work_max_side": 4096}))
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with client_for(server) as client:
            strip = submit(client, image=image(8, 8192), width=8, height=8192,
                           handles=[(4, 100)], targets=[(4, 120)], params={"work_size": 64})
            gate.set()
            with pytest.raises(JobFailed) as err:
                collect(client, strip)
            assert err.value.code == wire.INVALID_INPUT
            assert "64×65536" in err.value.message and "UNet passes" in err.value.message
    finally:
        server.stop()
        thread.join(10)
    assert not engine.runs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_full_job_events_in_order(transport):
    engine = FakeEngine(steps=4)
    with running_server(engine) as server, client_for(server, transport=transport) as client:
        job = submit(client, prompt="a photo", seed=5, mask=bytes(range(48)),
                     params={"work_size": 64}, method="gooddrag")
        events = collect(client, job)
    types = [e.type for e in events]
    assert types[:2] == ["queued", "started"] and types[-1] == "finished"
    assert events[0]["position"] == 1
    progress = [(e["phase"], e["step"], e["total"]) for e in events if e.type == "progress"]
    # In order, throttled: every phase starts with its first step and ends with its last.
    assert [p for p, _, _ in progress] == sorted((p for p, _, _ in progress), reverse=True)
    for phase in ("inversion", "drag"):
        steps = [s for p, s, t in progress if p == phase]
        assert steps[0] == 0 and steps[-1] == 3 and steps == sorted(set(steps))
    done = events[-1]
    assert (done["width"], done["height"], done["channels"]) == (8, 6, 3)
    assert done.image == bytes(255 - b for b in image())
    assert done["handles"] == [[4.0, 3.0]]
    assert set(done["timings"]) == {"inversion", "drag"}
    assert done["stats"] == {"steps": 4, "shape": [1, 2]}
    (request,) = engine.runs
    assert request.image.shape == (6, 8, 3) and request.mask.shape == (6, 8)
    assert (request.method, request.prompt, request.seed) == ("gooddrag", "a photo", 5)
    assert request.params == {"work_size": 64}
    assert request.handles == [(1.0, 1.0)] and request.targets == [(4.0, 3.0)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_finished_carries_the_pixel_type_and_the_engine_warnings(transport):
    engine = FakeEngine()
    with running_server(engine) as server, client_for(server, transport=transport) as client:
        assert client.hello()["dtypes"] == ["u8", "u16", "f32"]
        done = collect(client, submit(client, prompt="warn=one,two"))[-1]
        assert done["dtype"] == "u8" and done["warnings"] == ["one", "two"]
        assert collect(client, submit(client))[-1]["warnings"] == []
        for dtype in (np.uint16, np.float32):
            pixels = np.arange(8 * 6 * 3, dtype=dtype).reshape(6, 8, 3) * 300
            done = collect(client, submit(client, image=pixels))[-1]
            assert done["dtype"] == {np.uint16: "u16", np.float32: "f32"}[dtype]
            assert engine.runs[-1].image.dtype == dtype
            assert np.array_equal(engine.runs[-1].image, pixels)
            out = np.frombuffer(done.image, dtype).reshape(6, 8, 3)
            assert np.array_equal(out, (255 - pixels).astype(dtype))
        with pytest.raises(JobFailed, match="not accepted") as err:
            submit(client, image=bytes(8 * 6 * 3 * 8), dtype="f64")
        assert err.value.code == wire.INVALID_INPUT


def test_slow_steps_all_reported():
    with running_server(FakeEngine(steps=3, delay=0.08)) as server, client_for(server) as client:
        events = collect(client, submit(client))
    progress = [(e["phase"], e["step"]) for e in events if e.type == "progress"]
    assert progress == [(p, s) for p in ("inversion", "drag") for s in (0, 1, 2)]


def test_every_preview_the_engine_hands_over_is_sent(monkeypatch):
    """The engine throttles previews to PREVIEW_INTERVAL before copying them off the device
    (test_engine_speed's throttle test); its clock reads a little before the worker's, so the
    worker must not throw away one that arrives a few ms early. An engine that ignores the
    interval is still held to the floor."""
    job = Job(job_id="j1", session="s", route="s", parent={}, fingerprint=b"", request={},
              buffers=[])
    worker = engine_worker.EngineWorker(lambda: None, lambda: None)
    preview = worker._runner._preview_callback(job)
    clock = iter([10.0, 10.496, 10.992, 11.0, 11.1, 11.3])
    monkeypatch.setattr(engine_worker.time, "monotonic", lambda: next(clock))
    for step in range(6):
        preview("denoise", step, np.zeros((2, 2, 3), np.uint8))
    sent = [event.content["step"] for event in worker.events()]
    assert sent == [0, 1, 2, 5]  # 11.0 and 11.1 come within the floor of 10.992


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_preview_events_when_asked(transport):
    with (running_server(FakeEngine(steps=2)) as server,
          client_for(server, transport=transport) as client):
        events = collect(client, submit(client, preview=True))
        plain = collect(client, submit(client))
    previews = [e for e in events if e.type == "preview"]
    assert previews and previews[0].image == image() and previews[0]["width"] == 8
    assert not [e for e in plain if e.type == "preview"]


def test_version_mismatch_is_a_clear_error():
    with running_server(FakeEngine()) as server, client_for(server) as client:
        client._session.version = "2.0"
        with pytest.raises(IncompatibleVersion) as err:
            client.hello()
    assert "2.0" in str(err.value) and wire.PROTOCOL_VERSION in str(err.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_control_messages_are_not_stuck_behind_a_running_edit(transport):
    engine = FakeEngine(steps=200, delay=0.05)
    with running_server(engine) as server, client_for(server, transport=transport) as client:
        job = submit(client)
        assert engine.step_started.wait(5)
        assert client.ping()["running"] == job
        assert client.hello()["queue"]["running"] == job
        # Answered while the job runs (a 20 s job), not queued behind it: no wall clock needed.
        assert client.attach(job)["state"] == "running"
        assert client.cancel(job) == "cancelling"
        assert collect(client, job)[-1].type == "cancelled"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_running_job_within_one_step(transport):
    engine = FakeEngine(steps=1000, delay=0.02)
    with running_server(engine) as server, client_for(server, transport=transport) as client:
        job = submit(client)
        events = client.events(job)
        while next(events).type != "progress":
            pass
        assert client.cancel(job) == "cancelling"
        rest = list(events)
        assert client.cancel(job) == "cancelled"  # over: its state is reported
    assert rest[-1].type == "cancelled" and rest[-1]["reason"] == "client"
    assert engine.steps_after_cancel[0] <= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_queued_job_at_once(transport):
    engine = FakeEngine(steps=1000, delay=0.02)
    with running_server(engine) as server, client_for(server, transport=transport) as client:
        first = submit(client)
        second = submit(client)
        assert engine.step_started.wait(5)
        t0 = time.monotonic()
        assert client.cancel(second) == "cancelled"
        events = collect(client, second)
        assert time.monotonic() - t0 < 2.0
        assert [e.type for e in events][-1] == "cancelled"
        assert client.cancel(second) == "cancelled"  # idempotent
        client.cancel(first)
        collect(client, first)
    assert len(engine.runs) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_duplicate_submit_runs_once(transport):
    engine = FakeEngine(steps=3, delay=0.02)
    with (running_server(engine) as server, client_for(server, transport=transport) as a,
          client_for(server, transport=transport) as b):
        job = submit(a, job_id="same-id")
        assert submit(a, job_id="same-id") == "same-id"  # re-sent while queued or running
        events = collect(a, job)
        assert events[-1].type == "finished"
        # A re-sent submit after the end (e.g. from a reconnected client) gets the result again.
        assert submit(b, job_id="same-id") == "same-id"
        again = collect(b, job)
        assert again[-1].type == "finished" and again[-1].image == events[-1].image
        with pytest.raises(JobFailed) as err:
            submit(b, job_id="same-id", prompt="different")
        assert err.value.code == wire.JOB_ID_CONFLICT
        assert collect(a, job)[-1].type == "finished"  # asking again fetches the result again
    assert len(engine.runs) == 1


def test_expired_result_is_never_run_again():
    engine = FakeEngine()
    with running_server(engine, keep_results=1) as server, client_for(server) as client:
        collect(client, submit(client, job_id="one"))
        collect(client, submit(client, job_id="two"))  # pushes "one" out
        with pytest.raises(JobFailed) as err:
            submit(client, job_id="one")
        assert err.value.code == wire.RESULT_EXPIRED
        with pytest.raises(JobFailed) as err:
            client.attach("one")
        assert err.value.code == wire.UNKNOWN_JOB and "submit the edit again" in err.value.message
    assert len(engine.runs) == 2


def test_each_client_keeps_its_results_during_another_clients_cancel_storm():
    """N3: retention was global (32 jobs): a burst of cancelled jobs from one client evicted
    everybody's results, and 8 of 8 clients got ``unknown_job`` re-attaching a job that had
    just finished. Retention is per session now."""
    engine = FakeEngine(steps=2, delay=0.01)
    finished = threading.Semaphore(0)
    storm_done = threading.Event()
    outcome: dict[int, str] = {}

    def storm(server: Server) -> None:
        for _ in range(8):  # the honest jobs are over: their results are kept
            assert finished.acquire(timeout=120)
        with client_for(server) as bully:
            blocker = submit(bully, prompt="steps=100000 delay=0.01")  # keeps the others queued
            for n in range(200):
                bully.cancel(submit(bully, seed=n))
            bully.cancel(blocker)
        storm_done.set()

    def honest(server: Server, n: int) -> None:
        with client_for(server, timeout=10) as client:
            job = submit(client, seed=1000 + n)
            first = collect(client, job)[-1]
            finished.release()
            assert storm_done.wait(120)
            try:
                again = collect(client, job)  # attach: the terminal event is sent again
                outcome[n] = "same" if again[-1].image == first.image else "different"
            except JobFailed as exc:
                outcome[n] = exc.code

    with running_server(engine) as server:
        threads = [threading.Thread(target=storm, args=(server,))]
        threads += [threading.Thread(target=honest, args=(server, n)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    print(f"\nre-attached after a 200-job cancel storm: {outcome}")
    assert outcome == dict.fromkeys(range(8), "same")


def test_a_job_id_is_remembered_past_ten_thousand_newer_jobs():
    """N4: only the last 10,000 expired ids were remembered: a re-sent submit after 10,040
    newer jobs ran again."""
    table = JobTable()
    cancelled = Terminal(wire.CANCELLED, {"reason": "client"}, [])

    def run(job_id: str, session: str) -> None:
        job = Job(job_id, session, session, {}, b"", {}, [])
        table.add(job)
        table.finish(job, cancelled)

    run("first", "honest")
    for n in range(10_040):
        run(f"newer{n}", f"storm{n % 50}")
    assert table.get("first") is not None  # its session's result is still kept
    for n in range(40):
        run(f"own{n}", "honest")  # its own later jobs push it out
    assert table.get("first") is None and table.expired("first")
    assert not table.expired("never-seen")


def test_memory_caps_take_from_the_session_that_holds_the_most():
    table = JobTable(keep_bytes=1000, keep_records=30)

    def run(job_id: str, session: str, size: int) -> None:
        job = Job(job_id, session, session, {}, b"", {}, [])
        table.add(job)
        table.finish(job, Terminal(wire.FINISHED, {}, [bytes(size)]))

    run("mine", "honest", 100)
    for n in range(30):
        run(f"big{n}", "bully", 200)  # 6,000 bytes asked: 900 of them can stay
    assert table.get("mine") is not None
    assert [n for n in range(30) if table.get(f"big{n}")] == [26, 27, 28, 29]
    for n in range(40):
        run(f"small{n}", "bully", 0)  # more jobs than keep_records
    assert table.get("mine") is not None and table._records == 30


def test_remembered_job_ids_last_their_stated_time_in_bounded_memory():
    now = [0.0]
    ids = RanIds(seconds=100.0, limit=2400)
    ids.add("early", now[0])
    for n in range(10_000):  # a flood: bounded to the limit plus one bucket
        now[0] += 0.001
        ids.add(f"flood{n}", now[0])
        assert ids._count <= 2400 + 100
    assert "flood9999" in ids and "early" not in ids  # the oldest went first
    now[0] += 50
    ids.add("kept", now[0])
    now[0] += 99
    ids.add("later", now[0])
    assert "kept" in ids and "flood9999" in ids  # kept at least 100 s, a bucket more at most
    now[0] += 3
    ids.add("last", now[0])
    assert "flood9999" not in ids  # all of its bucket is over 100 s old
    assert "kept" in ids and "later" in ids and "last" in ids


def test_two_concurrent_clients_both_get_results():
    """One client on each transport, at the same time, on the same backend."""
    engine = FakeEngine(steps=3, delay=0.01)
    results: dict[int, list] = {}

    def work(server: Server, n: int) -> None:
        with client_for(server, transport=TRANSPORTS[n]) as client:
            results[n] = collect(client, submit(client, seed=n))

    with running_server(engine) as server:
        threads = [threading.Thread(target=work, args=(server, n)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sorted(results) == [0, 1]
    assert all(events[-1].type == "finished" for events in results.values())
    assert sorted(r.seed for r in engine.runs) == [0, 1]


def test_fair_queueing_across_clients():
    engine = FakeEngine(steps=1000, delay=0.01)
    with running_server(engine) as server, client_for(server) as a, client_for(server) as b:
        blocker = submit(a, seed=0)
        assert engine.step_started.wait(5)
        a_jobs = [submit(a, seed=n, prompt="steps=2") for n in (1, 2, 3)]
        b_job = submit(b, seed=9, prompt="steps=2")
        queued = next(e for e in b.events(b_job) if e.type == "queued")
        a.cancel(blocker)
        assert collect(b, b_job)[-1].type == "finished"
        assert all(collect(a, job)[-1].type == "finished" for job in a_jobs)
    assert queued["position"] == 2  # behind a's next job only, not behind all three
    assert [r.seed for r in engine.runs] == [0, 1, 9, 2, 3]


def test_fair_queue_order_is_round_robin():
    def job(session: str, n: int) -> Job:
        return Job(f"{session}{n}", session, session, {}, b"", {}, [])

    q = FairQueue()
    for j in [job("a", 1), job("a", 2), job("a", 3), job("b", 1), job("c", 1), job("b", 2)]:
        q.push(j)
    assert [j.job_id for j in q.order()] == ["a1", "b1", "c1", "a2", "b2", "a3"]
    popped = [q.pop().job_id for _ in range(3)]
    q.push(job("a", 4))
    assert popped + [j.job_id for j in q.order()] == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]


@pytest.mark.parametrize(("prompt", "fragment"), [
    ("raise=oom", "lower work_size"),
    ("raise=crash", "smaller work_size"),
])
def test_out_of_memory_fails_the_job_and_the_next_runs(prompt, fragment):
    engine = FakeEngine()
    with running_server(engine) as server, client_for(server) as client:
        with pytest.raises(JobFailed) as err:
            collect(client, submit(client, prompt=prompt))
        assert err.value.code == wire.OUT_OF_MEMORY and fragment in err.value.message
        assert collect(client, submit(client))[-1].type == "finished"


def test_engine_bug_is_an_engine_error_and_the_server_keeps_serving():
    with running_server(FakeEngine()) as server, client_for(server) as client:
        with pytest.raises(JobFailed) as err:
            collect(client, submit(client, prompt="raise=bug"))
        assert err.value.code == wire.ENGINE_ERROR and "something broke" in err.value.message
        assert "ValueError" in err.value.detail
        assert collect(client, submit(client))[-1].type == "finished"


def test_missing_model_is_reported_and_the_server_keeps_serving():
    def load():
        raise ModelNotFound("model 'nowhere' not found; pass --model PATH")

    with running_server(load=load) as server, client_for(server) as client:
        model = client.hello()["model"]
        assert model["state"] == "missing" and "--model PATH" in model["error"]
        with pytest.raises(JobFailed) as err:
            submit(client)
        assert err.value.code == wire.MODEL_NOT_FOUND and "--model PATH" in err.value.message
        assert client.ping()["queued"] == 0


def test_jobs_queued_while_the_model_loads_run_afterwards():
    gate = threading.Event()
    engine = FakeEngine()

    def load():
        gate.wait(10)
        return engine

    server = Server(load, model_name="slow", bind="tcp://127.0.0.1:0")
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with client_for(server) as client:
            assert client.hello()["model"]["state"] == "loading"
            job = submit(client)
            gate.set()
            assert collect(client, job)[-1].type == "finished"
    finally:
        server.stop()
        thread.join(10)


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"handles": [(100, 1)]}, wire.INVALID_INPUT),
    ({"method": "nope"}, wire.INVALID_INPUT),
    ({"params": {"no_such_knob": 1}}, wire.INVALID_INPUT),
    ({"params": {"work_size": 1}}, wire.INVALID_INPUT),
    ({"dtype": "u16"}, wire.INVALID_INPUT),
])
def test_invalid_submits_are_refused(kwargs, code):
    with running_server(FakeEngine()) as server, client_for(server) as client:
        client.hello()
        with pytest.raises(JobFailed) as err:
            submit(client, **kwargs)
        assert err.value.code == code
        # The server checks too, whatever a client checks locally.
        peer = RawPeer(server)
        content = {"job_id": "raw", "width": 8, "height": 6, "channels": 3,
                   "handles": [[1, 1]], "targets": [[2, 2]], "method": "dragdiffusion"}
        for key, value in kwargs.items():
            content[key] = [list(p) for p in value] if key == "handles" else value
        reply = peer.request(wire.SUBMIT, content, job_id="raw", buffers=[image()])
        peer.close()
    assert reply.msg_type == wire.ERROR and reply.content["code"] == code


def test_a_tall_strip_is_refused_before_any_work():
    """N1: an 8×8192 image at work_size 64 (a 64×65,536 canvas) was accepted: the server
    checked the settings on a square canvas, the engine checked the real one only when the
    job's turn came, and counted its passes by area. It ran 9 min 42 s, every other client's
    job waited behind it, and ``shutdown`` could not stop it."""
    engine = FakeEngine()
    with running_server(engine) as server, client_for(server) as client:
        t0 = time.monotonic()
        with pytest.raises(JobFailed) as err:
            submit(client, image=image(8, 8192), width=8, height=8192, handles=[(4, 100)],
                   targets=[(4, 120)], params={"work_size": 64})
        refused_in = time.monotonic() - t0
        assert client.ping()["queued"] == 0
    print(f"\n8×8192 at work_size 64: refused in {refused_in * 1000:.0f} ms: "
          f"{err.value.message}")
    assert err.value.code == wire.INVALID_INPUT and not engine.runs
    assert "64×65536" in err.value.message and "work_max_side (at most" in err.value.message


def test_queue_full_and_unknown_job():
    engine = FakeEngine(steps=1000, delay=0.02)
    limits = wire.Limits(max_queue=2)
    with running_server(engine, limits=limits) as server, client_for(server) as client:
        jobs = [submit(client) for _ in range(3)]  # one runs, two wait
        with pytest.raises(JobFailed) as err:
            submit(client)
        assert err.value.code == wire.QUEUE_FULL
        with pytest.raises(JobFailed) as err:
            client.cancel("no-such-job")
        assert err.value.code == wire.UNKNOWN_JOB
        for job in jobs:
            client.cancel(job)


def test_a_vanished_client_does_not_wedge_the_queue():
    engine = FakeEngine(steps=1000, delay=0.02)
    with running_server(engine, client_ttl=1.0) as server:
        ghost = RawPeer(server)
        for n in (1, 2):
            content = {"job_id": f"ghost{n}", "width": 8, "height": 6, "channels": 3,
                       "handles": [[1, 1]], "targets": [[2, 2]], "method": "dragdiffusion"}
            assert ghost.request(wire.SUBMIT, content, job_id=f"ghost{n}",
                                 buffers=[image()]).msg_type == wire.SUBMIT_REPLY
        assert engine.step_started.wait(5)
        ghost.close()  # gone without a word
        with client_for(server) as client:
            assert client.hello()["client_ttl"] == 1.0
            events = collect(client, submit(client, prompt="steps=2"))
            assert events[-1].type == "finished"
            assert client.attach("ghost1")["state"] == "cancelled"
            assert client.attach("ghost2")["state"] == "cancelled"
    assert [r.prompt for r in engine.runs] == ["", "steps=2"]


def test_a_vanished_clients_job_is_cancelled_once_not_at_every_housekeeping(caplog):
    """A running job only stops at its next step; meanwhile the server must not log the
    cancellation again at every housekeeping pass (it did, about every 0.3 s)."""
    engine = FakeEngine()
    with running_server(engine, client_ttl=0.5) as server:
        ghost = RawPeer(server)
        content = {"job_id": "slow", "width": 8, "height": 6, "channels": 3, "prompt":
                   "steps=2 delay=3", "handles": [[1, 1]], "targets": [[2, 2]],
                   "method": "dragdiffusion"}
        with caplog.at_level(logging.INFO, logger="backend.server"):
            assert ghost.request(wire.SUBMIT, content, job_id="slow",
                                 buffers=[image()]).msg_type == wire.SUBMIT_REPLY
            assert engine.step_started.wait(5)
            ghost.close()  # gone without a word, during a 3 s step
            deadline = time.monotonic() + 15
            while not engine.steps_after_cancel:  # the run has not ended yet
                assert time.monotonic() < deadline, "the ghost's job never ended"
                time.sleep(0.2)
            with client_for(server) as client:  # attaching moves the job to this client: after
                assert client.attach("slow")["state"] == "cancelled"
    silent = [r for r in caplog.records if "silent for" in r.getMessage()]
    assert len(silent) == 1, [r.getMessage() for r in silent]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_events_survive_a_reconnect(transport):
    """A client that recreates its socket (lazy pirate) re-attaches and gets the result."""
    engine = FakeEngine(steps=5, delay=0.05)
    with running_server(engine) as server, client_for(server, transport=transport) as client:
        job = submit(client)
        client._reopen()  # the old socket, and its queued events, are gone
        events = collect(client, job)
    assert events[-1].type == "finished"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_backend_raises_within_the_timeout(transport):
    client = Client("tcp://127.0.0.1:9", b"k" * 32, timeout=0.3, retries=2, transport=transport)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as err:
        client.hello()
    elapsed = time.monotonic() - t0
    client.close()
    assert 0.8 < elapsed < 3.0  # 3 attempts × 0.3 s, plus slack for a loaded machine
    assert "tcp://127.0.0.1:9" in str(err.value) and "python -m backend serve" in str(err.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_key_says_the_connection_file_is_stale(transport):
    """The backend refuses the PLAIN login with libzmq's ERROR: libzmq reports a failed handshake,
    the pure transport reads the ERROR command; both are ``WrongKey`` with the same words."""
    with (running_server(FakeEngine()) as server,
          Client(server.endpoint, b"x" * 32, timeout=0.5, retries=0,
                 transport=transport) as client,
          pytest.raises(WrongKey, match="connection file is out of date") as err):
        client.ping()
        assert server._transport.gate.denied >= 1
    assert err.value.code == "wrong_key"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_after_a_wrong_key_the_same_client_keeps_saying_so(transport):
    """N9: after ``WrongKey``, the same client object's next wait reported that the backend
    "stopped answering", at once (the unanswered login still counted as silence)."""
    with (running_server(FakeEngine()) as server,
          Client(server.endpoint, b"x" * 32, timeout=1.0, retries=1,
                 transport=transport) as client):
        with pytest.raises(WrongKey):
            client.ping()
        time.sleep(2.5)  # longer than the client's liveness (2 s)
        for again in (lambda: list(client.events("job1")), client.ping):
            with pytest.raises(WrongKey) as err:
                again()
            assert "with another key" in str(err.value)
            assert "stopped answering" not in str(err.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_file_lifecycle(tmp_path, transport):
    path = tmp_path / "backend.json"
    with running_server(FakeEngine(), connection_file=path) as server:
        info = connection.read_connection_file(path)
        assert info.endpoint == server.endpoint and info.key == server.key
        with Client.from_connection_file(path, timeout=2, transport=transport) as client:
            assert client.transport == transport
            assert client.ping()["running"] is None
        with pytest.raises(ServerError, match="already running"):
            Server(lambda: None, model_name="x", bind="tcp://127.0.0.1:0",
                   connection_file=path).start()
    assert not path.exists()
    with pytest.raises(BackendUnavailable, match="python -m backend serve"):
        Client.from_connection_file(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_a_stale_connection_file_others_can_read_is_replaced_with_a_notice(tmp_path, caplog):
    """N8: the server took a world-readable file (0644) over without a word. It replaces it
    with a private one (0600, a new key) and says why in its log."""
    path = tmp_path / "backend.json"
    connection.write_connection_file(path, connection.ConnectionInfo("tcp://127.0.0.1:9",
                                                                     b"k" * 32))
    os.chmod(path, 0o644)
    caplog.set_level("WARNING", logger="backend.server")
    with running_server(FakeEngine(), connection_file=path) as server:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert connection.read_connection_file(path).key == server.key != b"k" * 32
    (notice,) = [r.getMessage() for r in caplog.records if "readable by other" in r.getMessage()]
    assert str(path) in notice and "mode 644" in notice and "mode 600, a new key" in notice


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shutdown_cancels_everything_and_stops(transport):
    engine = FakeEngine(steps=1000, delay=0.02)
    with running_server(engine) as server, client_for(server, transport=transport) as client:
        running, waiting = submit(client), submit(client)
        assert engine.step_started.wait(5)
        assert sorted(client.shutdown()) == sorted([running, waiting])
        assert collect(client, waiting)[-1]["reason"] == "shutdown"
        assert collect(client, running)[-1]["reason"] == "shutdown"
        with pytest.raises(BackendUnavailable):
            Client(server.endpoint, server.key, timeout=0.3, retries=0,
                   transport=transport).ping()


def test_refuses_a_public_bind_without_curve():
    with pytest.raises(ServerError, match="--curve"):
        Server(lambda: None, model_name="x", bind="tcp://0.0.0.0:0").start()


def test_one_log_line_per_job(caplog):
    caplog.set_level("INFO", logger="backend.server")
    with running_server(FakeEngine()) as server, client_for(server) as client:
        job = submit(client, mask=bytes(48), method="gooddrag")
        collect(client, job)
    (line,) = [r.getMessage() for r in caplog.records if f"job {job}" in r.getMessage()]
    assert "finished" in line and "8x6x3 +mask" in line and "method gooddrag" in line
    assert "inversion=" in line and "drag=" in line and "1 points" in line


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_image_over_the_frame_limit_is_refused_before_sending(transport):
    """11.8: the client sent it anyway; libzmq dropped it and 24 s later the user read that
    no backend answered."""
    limits = wire.Limits(max_frame_bytes=2**20)
    with (running_server(FakeEngine(), limits=limits) as server,
          client_for(server, transport=transport) as client):
        t0 = time.monotonic()
        with pytest.raises(JobFailed) as err:
            submit(client, image=bytes(1000 * 700 * 3), width=1000, height=700)
        assert time.monotonic() - t0 < 1.0
        assert client.ping()["queued"] == 0
    message = err.value.message
    assert err.value.code == wire.INVALID_INPUT
    assert "the image is 2.0 MB" in message and "at most 1.0 MB" in message
    assert "--max-frame-mb 3" in message


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_ipv6_loopback_bind_serves(transport):
    """11.9: --bind tcp://[::1]:PORT failed with 'No such device' (ZMQ_IPV6 was off)."""
    with running_server(FakeEngine(), bind="tcp://[::1]:0") as server:
        assert server.endpoint.startswith("tcp://[::1]:")
        with client_for(server, transport=transport) as client:
            assert client.ping()["queued"] == 0
            assert collect(client, submit(client))[-1].type == "finished"


def test_a_missing_default_model_falls_back_to_the_demo_model_and_says_so():
    """12.8: the first run on a fresh machine serves the shipped demo model instead of none."""
    from backend.model_choice import Fallback

    def missing():
        raise ModelNotFound("model stable-diffusion-v1-5 was not found in the cache")

    demo = FakeEngine()
    fallback = Fallback("backend/demo/model", lambda: demo, "get SD1.5 like this")
    with running_server(load=missing, fallback=fallback) as server, \
            client_for(server) as client:
        model = client.hello()["model"]
        assert collect(client, submit(client))[-1].type == "finished"
        notice = server.demo_notice
    assert model["state"] == "ready" and model["demo"] is True and model["error"] is None
    assert model["requested"] == "fake-model" and "not found in the cache" in model["why"]
    assert model["hint"] == "get SD1.5 like this"
    assert "demo model backend/demo/model" in notice and "simple shapes" in notice
    assert len(demo.runs) == 1


def test_an_available_model_is_served_as_today_with_a_fallback_configured():
    from backend.model_choice import Fallback

    fallback = Fallback("backend/demo/model", lambda: FakeEngine(), "hint")
    with running_server(FakeEngine(), fallback=fallback) as server, \
            client_for(server) as client:
        model = client.hello()["model"]
        assert server.demo_notice is None
    assert model == {"name": "fake-model", "state": "ready", "error": None}  # no "demo"


class IdentityEngine(FakeEngine):
    """Returns its input as the result: only the transport's own copies remain."""

    def run(self, request, progress=None, cancel=None, preview=None, preview_interval=0.0):
        return DragResult(image=request.image, handles=list(request.targets), timings={})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_large_result_crosses_server_and_client_without_a_full_copy(transport):
    """13.3: the server copied the result (tobytes) and the client copied it again at every
    look at ``Event.image``. libzmq holds a received frame outside Python's allocator; the
    pure transports (the client's ZmtpDealer, the server's ZmtpRouter for the upload) read it
    into one ``bytearray`` of its size, which is all they allocate."""
    import tracemalloc

    w, h, c = 2000, 1500, 4
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, c), dtype=np.uint8)
    with (running_server(IdentityEngine()) as server,
          client_for(server, transport=transport, timeout=10) as client):
        client.hello()
        tracemalloc.start()
        t0 = time.perf_counter()
        done = collect(client, client.submit(pixels, w, h, c, [(1, 1)], [(2, 2)]))[-1]
        view = done.buffer
        elapsed = time.perf_counter() - t0
        peak_view = tracemalloc.get_traced_memory()[1]
        first, second = done.image, done.image
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"\n{w}x{h}x{c} round trip {elapsed:.3f} s; Python allocations: "
          f"{peak_view / 2**20:.1f} MiB through Event.buffer, {peak_bytes / 2**20:.1f} MiB "
          f"after two looks at Event.image (image {pixels.nbytes / 2**20:.1f} MiB)")
    assert np.array_equal(np.frombuffer(view, np.uint8).reshape(h, w, c), pixels)
    assert first is second and first == pixels.tobytes()
    # the receive buffers themselves: the server's upload, and the client's result on zmtp
    received = pixels.nbytes * (1 if transport == "pyzmq" else 2)
    assert peak_view < received + pixels.nbytes / 4  # no full copy on the way
    assert peak_bytes < received + 1.5 * pixels.nbytes  # bytes made once
