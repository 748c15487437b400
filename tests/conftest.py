"""Shared fixtures: locally built tokenizers, the quickstart's data and one pool of gloo worker
processes per session, and a one-process gloo group per module."""

import importlib.util

import pytest  # noqa: E402
from dist_pool import WorkerPool  # noqa: E402
from tokenizer_fixtures import *  # noqa: F401,F403

# Megatron-LM's training loop ships in megatron-core's wheel from 0.19 on: scripts/test.sh runs
# this file with 0.19 first on PYTHONPATH (the whole suite runs under 0.16, where it cannot
# import).
collect_ignore = [] if importlib.util.find_spec("megatron.training") else [
    "test_megatron_lm_pretrain.py"]


@pytest.fixture(scope="session")
def pool4():
    """Four gloo processes for the whole session: TP groups of 1, 2 and 4 inside."""
    pool = WorkerPool(4)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The quickstart's data, built once a session (300 documents: the tokenizer, whose digits
    are number tokens and </s> = 2, the train/valid .bin/.idx and the frequency file). Runs
    only read it: megatron-core's index cache goes under each run's output directory."""
    from token_objectives.quickstart.build_data import build_quickstart_data

    return build_quickstart_data(tmp_path_factory.mktemp("quickstart_data"), num_documents=300)


@pytest.fixture(scope="module")
def process_group():
    """A real one-process gloo group: gpt_dataset synchronises its index cache with barriers."""
    import torch.distributed as dist
    from torchrun_helpers import free_port

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()
