"""A tiny talker folder written once per session (the same writer the demo checkpoint uses)."""

import pytest


@pytest.fixture(scope="session")
def tiny_talker_dir(tmp_path_factory):
    from engine.models.talker.tiny import write_tiny_talker
    return write_tiny_talker(tmp_path_factory.mktemp("tiny-talker"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_talker_dir):
    from engine.models.talker.pipeline import TalkerPipeline
    return TalkerPipeline.load(tiny_talker_dir)
