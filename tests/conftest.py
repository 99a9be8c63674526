import zlib

import pytest
import torch


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


@pytest.fixture(autouse=True, scope="session")
def _fresh_compiles():
    # Inductor's on-disk caches do not key on a custom op's fake implementation, so a graph cached
    # by an older checkout (say, one whose select_blocks returned int32 indices) would be reused.
    # Every torch.compile in the tests compiles afresh.
    from torch._inductor import config

    with config.patch(force_disable_caches=True):
        yield
