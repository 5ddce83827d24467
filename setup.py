"""Ahead-of-time build: deepatlas_cuda/_C (CPU kernels, always) and deepatlas_cuda/_C_cuda (CUDA kernels, when
nvcc and a CUDA build of torch are present). Install with the torch you already have:

    pip install --no-build-isolation .        # or -e . for development

Switches (environment): DEEPATLAS_CUDA=0|1, TORCH_CUDA_ARCH_LIST, MAX_JOBS, DEEPATLAS_DEBUG=1, DEEPATLAS_NATIVE=1,
CUDA_HOME.
"""

import importlib.util
import json
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_deepatlas_build", ROOT / "deepatlas_cuda" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()
PARAMS = _build.build_params(ROOT / "csrc")
_build.configure_torch_env(PARAMS)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402  (after env setup)


def _relative(paths):
    return [str(Path(p).relative_to(ROOT)) for p in paths]


class BuildWithConfig(BuildExtension):
    """Builds the libraries, then records how (read by build_info() and by the loader's torch-version check)."""

    def run(self):
        print(f"deepatlas_cuda: CUDA library {'on' if PARAMS.with_cuda else 'off'} ({PARAMS.cuda_reason}); "
              f"archs {PARAMS.arch_list or '-'}; MAX_JOBS={PARAMS.max_jobs}; debug={PARAMS.debug}", file=sys.stderr)
        super().run()
        target = Path(self.get_ext_fullpath("deepatlas_cuda._C")).parent
        (target / "_build_config.json").write_text(json.dumps(PARAMS.config(), indent=2) + "\n")


extensions = [
    CppExtension(
        "deepatlas_cuda._C",
        _relative(PARAMS.cpu_sources),
        include_dirs=PARAMS.include_dirs,
        extra_compile_args={"cxx": PARAMS.cxx_flags},
        extra_link_args=PARAMS.ld_flags,
    )
]
if PARAMS.with_cuda:
    extensions.append(
        CUDAExtension(
            "deepatlas_cuda._C_cuda",
            _relative(PARAMS.cuda_sources),
            include_dirs=PARAMS.include_dirs,
            extra_compile_args={"cxx": PARAMS.cxx_flags, "nvcc": PARAMS.nvcc_flags},
            extra_link_args=PARAMS.ld_flags,
        )
    )

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildWithConfig.with_options(use_ninja=True)},
)
