import pytest
import torch

import deepatlas_cuda

HAS_CUDA = torch.cuda.is_available() and deepatlas_cuda.build_info()["cuda_kernels"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
