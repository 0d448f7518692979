"""The suite is offline whatever the order its modules are imported in, and says so when a test reaches out."""

from __future__ import annotations

import socket

import pytest


def test_huggingface_hub_is_offline():
    """huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported, which may be while pytest
    collects a module that imports diffusers: conftest sets it before any of that."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is True


def test_reaching_the_network_fails_at_once():
    from conftest import NetworkUsed

    with pytest.raises(NetworkUsed, match="a test tried to reach the network"):
        socket.create_connection(("192.0.2.1", 443), timeout=5)  # TEST-NET-1: never a real host
