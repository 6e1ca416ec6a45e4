"""The server's Inpaint4Drag additions (protocol 1.1): hello announces the method, its default
and what the loaded models can run; ``warp`` answers with the warped layer and the inpainting
mask at once, authenticated and size-capped like ``submit``, even while an edit runs."""

from __future__ import annotations

import numpy as np
import pytest
import warp_cases as wc
from fixtures_server import FakeEngine, RawPeer, client_for, running_server, submit

from backend.engine.inpaint4drag import preview_warp
from backend.engine.params import MethodTable, served_algorithms
from backend.engine.types import DEFAULT_METHOD
from protocol import wire
from protocol.client import JobFailed


def layer(width: int = 64, height: int = 48, channels: int = 4, dtype=np.uint16):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    pixels = rng.integers(0, top + 1, (height, width, channels), dtype=dtype)
    mask = (wc.disc((height, width), 20, 22, 9) * 255).astype(np.uint8)
    return pixels, mask


def test_hello_announces_inpaint4drag_as_the_engine_s_default():
    with running_server(FakeEngine()) as server, client_for(server) as client:
        info = client.hello()
    assert "inpaint4drag" in info["methods"] and info["default_method"] == DEFAULT_METHOD
    assert "region that moves" in info["descriptions"]["inpaint4drag"]
    assert info["parameters"]["inpaint_steps"]["methods"] == ["inpaint4drag"]
    assert info["limits"]["max_warp_pixels"] == wire.Limits().max_warp_pixels


class InpaintOnlyEngine(FakeEngine):
    """An engine with only an inpainting model: its table runs Inpaint4Drag alone."""

    def __init__(self) -> None:
        super().__init__(table=MethodTable(algorithms=served_algorithms(plain_model=False)))

    def info(self):
        return {**super().info(), "inpaint_model": "tiny (SD1.5 inpainting)",
                "filler": "tiny (SD1.5 inpainting)"}


def test_hello_lists_only_what_the_loaded_models_run():
    """Announced while loading: every method; once loaded, the engine's own table."""
    with running_server(InpaintOnlyEngine()) as server, client_for(server) as client:
        info = client.hello()
    assert list(info["methods"]) == ["inpaint4drag"] == list(info["descriptions"])
    assert info["default_method"] == "inpaint4drag"
    assert info["model"]["inpaint_model"] == "tiny (SD1.5 inpainting)"


def test_warp_returns_the_engine_s_warp_in_the_layer_s_dtype():
    pixels, mask = layer()
    handles, targets = [(20.5, 22.5)], [(40.5, 30.5)]
    with running_server(FakeEngine()) as server, client_for(server) as client:
        reply = client.warp(pixels, 64, 48, 4, handles, targets, mask)
    warped, hole, figures = preview_warp(pixels, mask, handles, targets)
    assert reply["dtype"] == "u16" and (reply["width"], reply["height"]) == (64, 48)
    got = np.frombuffer(reply.image, np.dtype("<u2")).reshape(48, 64, 4)
    np.testing.assert_array_equal(got, warped)
    np.testing.assert_array_equal(np.frombuffer(reply.mask, np.uint8).reshape(48, 64), hole)
    assert reply["moved_pixels"] == figures["moved_pixels"] > 0
    assert reply["inpaint_pixels"] == int((hole > 0).sum()) > 0


def test_warp_with_overlay_paints_the_grid_and_keeps_the_rest():
    pixels, mask = layer(channels=3, dtype=np.uint8)
    with running_server(FakeEngine()) as server, client_for(server) as client:
        reply = client.warp(pixels, 64, 48, 3, [(20.5, 22.5)], [(40.5, 30.5)], mask,
                            overlay=True, params={"inpaint_kernel": 9})
    got = np.frombuffer(reply.image, np.uint8).reshape(48, 64, 3)
    hole = np.frombuffer(reply.mask, np.uint8).reshape(48, 64) > 0
    assert set(np.unique(got[hole])) <= {0, 255}
    plain, _, _ = preview_warp(pixels, mask, [(20.5, 22.5)], [(40.5, 30.5)],
                               {"inpaint_kernel": 9})
    np.testing.assert_array_equal(got[~hole], plain[~hole])


def test_warp_knobs_left_out_take_the_engine_s_table_values():
    """As for an edit, a knob the request leaves out runs at the table's value: here a model
    whose preset.json widens the inpainting margin."""
    pixels, mask = layer(channels=3, dtype=np.uint8)
    wide = MethodTable({"inpaint_kernel": 15})
    with running_server(FakeEngine(table=wide), table=wide) as server, \
            client_for(server) as client:
        reply = client.warp(pixels, 64, 48, 3, [(20.5, 22.5)], [(40.5, 30.5)], mask)
    _, hole, _ = preview_warp(pixels, mask, [(20.5, 22.5)], [(40.5, 30.5)],
                              {"inpaint_kernel": 15})
    _, narrow, _ = preview_warp(pixels, mask, [(20.5, 22.5)], [(40.5, 30.5)])
    got = np.frombuffer(reply.mask, np.uint8).reshape(48, 64)
    np.testing.assert_array_equal(got, hole)
    assert (got > 0).sum() > (narrow > 0).sum()


@pytest.mark.parametrize("change,match", [
    ({"handles": [(2.5, 2.5)]}, "not on the selection"),
    ({"params": {"inpaint_kernel": 99}}, "inpaint_kernel"),
    ({"params": {"nonsense": 1}}, "unknown parameter"),
])
def test_a_bad_warp_is_refused_with_one_clear_line(change, match):
    pixels, mask = layer(channels=3, dtype=np.uint8)
    args = dict(handles=[(20.5, 22.5)], targets=[(40.5, 30.5)], params={})
    args.update(change)
    with running_server(FakeEngine()) as server, client_for(server) as client:
        with pytest.raises(JobFailed, match=match) as err:
            client.warp(pixels, 64, 48, 3, args["handles"], args["targets"], mask,
                        params=args["params"])
        assert err.value.code == wire.INVALID_INPUT
        assert client.ping()  # still serving


def test_warp_is_capped_by_the_server_s_limit_even_from_a_raw_peer():
    pixels, mask = layer(channels=3, dtype=np.uint8)
    limits = wire.Limits(max_warp_pixels=1000)
    with running_server(FakeEngine(), limits=limits) as server:
        with client_for(server) as client, pytest.raises(JobFailed, match="scaled down"):
            client.warp(pixels, 64, 48, 3, [(20.5, 22.5)], [(40.5, 30.5)], mask)
        peer = RawPeer(server)  # a client that skips its own check is refused by the server
        content = {"width": 64, "height": 48, "channels": 3, "handles": [[20.5, 22.5]],
                   "targets": [[40.5, 30.5]]}
        peer.socket.send_multipart(peer.frames(wire.WARP, content,
                                               buffers=[pixels.tobytes(), mask.tobytes()]))
        assert peer.socket.poll(5000)
        reply = peer.session.parse(peer.socket.recv_multipart())
        assert reply.msg_type == wire.ERROR and reply.content["code"] == wire.INVALID_INPUT


def test_warp_answers_while_an_edit_runs():
    """The warp needs no model and no queue: it is answered while an edit still runs."""
    pixels, mask = layer(channels=3, dtype=np.uint8)
    engine = FakeEngine(steps=400, delay=0.05)  # 40 s of edit
    with running_server(engine) as server, client_for(server) as client:
        job = submit(client, prompt="steps=400 delay=0.05")
        assert engine.step_started.wait(10)
        reply = client.warp(pixels, 64, 48, 3, [(20.5, 22.5)], [(40.5, 30.5)], mask)
        assert reply["moved_pixels"] > 0
        assert client.ping()["running"] == job  # the edit was still running
        assert client.cancel(job) == "cancelling"
