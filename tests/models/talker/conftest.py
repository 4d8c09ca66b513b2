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


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (thread hand-offs cost more than these ops on a busy CPU)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
