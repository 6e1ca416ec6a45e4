"""Shared test fixtures. Nothing here downloads: the Hugging Face hub is switched off."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random SD model saved once per session as a diffusers folder."""
    from backend.engine.random_tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-sd")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module that compares two runs bit for bit.

    With two threads some CPU kernels split their sums by how the threads happen to be
    scheduled, so two identical runs can differ in the last bit when the other core is busy;
    tiny tensors gain nothing from the threads anyway.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_hub_repos(tmp_path_factory):
    """The local hub's tiny repositories (tests/hub_server.py), built once per session."""
    from hub_server import tiny_repos

    return tiny_repos(tmp_path_factory.mktemp("hub-repos"))


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed in this process (conftest switches the hub off for every test)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
