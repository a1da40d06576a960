"""Fixtures shared by the server tests: the tiny checkpoint loaded once per module, and a client."""

import pytest

from starcoder2 import load
from tests.server import make_client


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return load(tiny_checkpoint, dtype="fp32")


@pytest.fixture(scope="module")
def client(lm):
    with make_client(lm) as c:
        yield c
