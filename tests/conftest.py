"""Shared fixtures: the device under test and the dtypes it can check.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (set before moetune imports
triton). The interpreter cannot do ``tl.dot`` on bfloat16 (triton-lang/triton #11584), so CPU runs
check float16 and float32; a GPU run adds bfloat16.
"""

import os
import zlib

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_GPU else [])


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE


SEED = int(os.environ.get("MOETUNE_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (and per MOETUNE_TEST_SEED run); failures replay exactly."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + SEED)
