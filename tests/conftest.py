import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from benchlib import poisoned_outputs  # noqa: E402

# Deterministic mode (below) asks cuBLAS for a fixed workspace; set it before cuBLAS starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Distinct random inputs per test, reproducible from the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _poisoned_outputs(request):
    """In GPU tests every tensor torch hands out uninitialised (torch.empty, at::empty in the ops:
    outputs and workspaces) is filled first, floats with NaN and integers with their largest value,
    so an element a kernel fails to write shows up in the comparison against the reference
    (benchlib.poisoned_outputs, which the benchmarks' output checks use too)."""
    if "gpu" not in request.keywords:
        yield
        return
    with poisoned_outputs():
        yield


@pytest.fixture(autouse=True, scope="session")
def _fresh_compiles():
    # Inductor's on-disk caches do not key on a custom op's fake implementation, so a graph cached
    # by an older checkout (say, one whose select_blocks returned int32 indices) would be reused.
    # Every torch.compile in the tests compiles afresh.
    from torch._inductor import config

    with config.patch(force_disable_caches=True):
        yield
