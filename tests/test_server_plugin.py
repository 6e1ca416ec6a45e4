"""What the plug-in says when the backend side goes wrong (issue 11): a foreign key, a dead or
silent backend, a layer over the frame limit. The plug-in's conversation module runs outside
GIMP against a real server with the fake engine."""

from __future__ import annotations

import os

import pytest
from fixtures_server import FakeEngine, running_server
from plugin_modules import load

from protocol import wire

db = load("dragdiff_backend")


def test_a_backend_with_another_key_is_named_not_called_missing(tmp_path):
    """11.4: the right endpoint with a wrong key used to say 'backend is not running'."""
    path = tmp_path / "backend.json"
    with running_server(FakeEngine()) as server:
        wire.write_connection_file(path, wire.ConnectionInfo(server.endpoint, os.urandom(32)))
        with pytest.raises(db.BackendError) as err:
            db.try_connect(path, 2.0)
    text = str(err.value)
    assert "answers at " + server.endpoint in text and "with another key" in text
    assert "restart" in text and "not running" not in text
