"""Fixtures for end-to-end tests: a small corpus built once per session with the real pipeline."""

import pytest

from neox.data.default_corpus import build_default_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The embedded-default pipeline on a small slice: Python docs/stdlib -> BPE (512) -> .bin/.idx."""
    out = tmp_path_factory.mktemp("corpus")
    return build_default_corpus(out, max_bytes=400_000, vocab_size=512, log=None)
