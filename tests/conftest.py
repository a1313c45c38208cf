"""Shared pytest set-up: the `gpu` and `slow` markers, and one local Ray
cluster for the whole session (starting Ray costs seconds; tests share it)."""

from __future__ import annotations

import os

import pytest

# Tests never reach the network: make the HF libraries fail fast instead of
# trying a download when a path is wrong.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def command_logging():
    """The package's warnings on stderr as the `rlhf-ray` command shows them (`cli.errors.configure_logging`),
    for a test that calls the package directly; removed again after the test."""
    import logging

    from rlhf_ray.cli.errors import configure_logging

    logger = logging.getLogger("rlhf_ray")
    before = list(logger.handlers)
    configure_logging()
    yield
    for handler in logger.handlers[:]:
        if handler not in before:
            logger.removeHandler(handler)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow")
    has_cuda = _cuda_available()
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    skip_gpu = pytest.mark.skip(reason="gpu: needs CUDA, absent on this machine")
    for item in items:
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(skip_slow)
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def actor_tmpdir():
    """The temp folder (TMPDIR) of the actors of `ray_cluster`: this session's own, so that a test can see
    what its jobs leave behind without mistaking another process's files for theirs; removed at the end."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="rlhf-ray-actors-"))  # short: sockets made under it must fit 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(actor_tmpdir):
    """A local Ray cluster shared by every test that needs actors.

    Four logical CPUs on a two-core machine: actors mostly wait on each
    other, and tests that need a placement group of several ranks must fit.
    The actors' temp folder is `actor_tmpdir`; torch's compile cache stays
    where it would be without it (warm across sessions). Its workers get the
    jobs' accelerator environment (`ACCELERATOR_ENV`): on a GPU machine an
    actor that reserved no GPU sees none, as in a job."""
    import getpass
    import tempfile

    import ray

    from rlhf_ray.runtime.distributed import ACCELERATOR_ENV

    inductor_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                                      "TMPDIR": str(actor_tmpdir), "TORCHINDUCTOR_CACHE_DIR": inductor_cache,
                                      **ACCELERATOR_ENV}},
            _system_config={"worker_niceness": 0},  # as rlhf-ray's own clusters (runtime/role_groups.py)
        )
    yield ray
    ray.shutdown()


def forget_deepspeed_process_group() -> None:
    """After a test module destroys its torch.distributed group, drop DeepSpeed's cached
    backend too, so the next module's `deepspeed.init_distributed` builds a fresh one instead
    of reusing a handle to the destroyed group."""
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:  # the data-parallel groups cached from the destroyed world
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
                setattr(groups, name, {} if isinstance(value, dict) else None)
        groups.mpu = None
        groups.mesh_device = None


@pytest.fixture(scope="module")
def world_of_one():
    """torch.distributed in this process, a gloo world of one rank (as DeepSpeed needs), for one test
    module; torn down after it, environment and DeepSpeed's cached groups as they were."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from rlhf_ray.runtime.distributed import find_free_port

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            pytest.skip("torch.distributed already initialised with several ranks in this process")
        yield
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
            forget_deepspeed_process_group()
