import pytest
import torch

import deepatlas_cuda

GPU_VISIBLE = torch.cuda.is_available()
HAS_CUDA = GPU_VISIBLE and deepatlas_cuda.build_info()["cuda_kernels"]
# A GPU without the CUDA library is a build that skipped nvcc: say so, rather than skip as if there were no GPU.
SKIP_REASON = ("a CUDA GPU is visible but deepatlas_cuda was built without its CUDA library (no nvcc, or "
               "DEEPATLAS_CUDA=0): rebuild with nvcc on PATH, e.g. DEEPATLAS_CUDA=1 DEEPATLAS_REBUILD=1 "
               "scripts/setup_env.sh" if GPU_VISIBLE else "needs a CUDA GPU and the CUDA kernels")


def pytest_report_header(config):
    if GPU_VISIBLE and not HAS_CUDA:
        return f"deepatlas_cuda: the CUDA tests are skipped: {SKIP_REASON}"
    return None


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
