"""How the native libraries are built: one function, used by setup.py (ahead of time) and by the JIT fallback.

Environment switches:
  DEEPATLAS_CUDA=0|1      force the CUDA library off / on (default: on when nvcc and a CUDA build of torch exist)
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0" (default: Volta..Hopper and newer, clamped to what nvcc supports)
  MAX_JOBS                parallel compile jobs (default: from cores and available memory)
  DEEPATLAS_DEBUG=1       -O0 -g host code, -G device code, assertions on
  DEEPATLAS_SANITIZE=1    CPU library only, with AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize.sh)
  DEEPATLAS_NATIVE=1      CPU code for the building machine's own instruction set (-march=native; results unchanged)
  DEEPATLAS_CPU_AVX2=0    no AVX2 copy of the CPU loops (default: one, chosen at run time; csrc/cpu/isa.h)
  CUDA_HOME               toolkit root (default: found from nvcc, following wrapper scripts)

This file must not import the package (setup.py loads it by path) and imports torch lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

# Volta, Turing, Ampere, Ada, Hopper, Blackwell: the default targets, kept where the installed nvcc supports them.
DEFAULT_ARCHS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")

CPU_SOURCES = ("ops.cpp", "cpu/sample_cpu.cpp", "cpu/labels_cpu.cpp", "cpu/jacobian_cpu.cpp", "cpu/dice_cpu.cpp")
CUDA_SOURCES = ("cuda/sample_kernels.cu", "cuda/labels_kernels.cu", "cuda/jacobian_kernels.cu",
                "cuda/dice_kernels.cu", "cuda/ops_cuda.cpp")

NVCC_JOB_GB = 2.5  # peak resident memory of one nvcc job on these kernels, rounded up

# Host-code flags of a DEEPATLAS_NATIVE=1 build: the building CPU's instruction set (AVX2, AVX-512, ...) for the
# vectorised loops, without contracting a * b + c into fused multiply-adds, so that every result keeps the bits of
# the default build (tests/test_build.py checks the flags; the op tests run on either). The library then runs only
# on CPUs with that instruction set: not for a build host that differs from the machines that run it.
NATIVE_FLAGS = ("-march=native", "-ffp-contract=off")

# Compile and link flags of a DEEPATLAS_SANITIZE=1 build: any UBSan report aborts instead of printing and going on;
# float-cast-overflow (a float to integer conversion out of range: undefined on the CPU, saturating on a GPU) is not
# part of g++'s "undefined"; -g puts file and line numbers into the reports.
SANITIZE_FLAGS = ("-fsanitize=address,undefined,float-cast-overflow", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=undefined,float-cast-overflow", "-g")


@dataclasses.dataclass
class BuildParams:
    csrc: Path
    with_cuda: bool
    cuda_reason: str
    cuda_home: str | None
    cuda_version: str | None
    arch_list: list[str]
    debug: bool
    max_jobs: int
    cxx_flags: list[str]
    nvcc_flags: list[str]
    ld_flags: list[str]

    @property
    def include_dirs(self) -> list[str]:
        return [str(self.csrc / "include"), str(self.csrc)]

    @property
    def cpu_sources(self) -> list[str]:
        return [str(self.csrc / s) for s in CPU_SOURCES]

    @property
    def cuda_sources(self) -> list[str]:
        return [str(self.csrc / s) for s in CUDA_SOURCES]

    def source_hash(self) -> str:
        """Hash of every library source and header plus the flags: the JIT cache key's content part."""
        digest = hashlib.sha256(sources_hash(self.csrc).encode())
        flags = [self.cxx_flags, self.nvcc_flags, self.ld_flags, self.arch_list, self.with_cuda, self.debug]
        digest.update(json.dumps(flags).encode())
        return digest.hexdigest()[:16]

    def config(self) -> dict:
        """What build_info() reports about this build; written next to prebuilt libraries."""
        import torch

        return {
            "torch_version": torch.__version__,
            "with_cuda": self.with_cuda,
            "cuda_version": self.cuda_version,
            "cuda_arch_list": self.arch_list,
            "debug": self.debug,
            "native": "-march=native" in self.cxx_flags,
            "source_hash": self.source_hash(),
            "sources_hash": sources_hash(self.csrc),
        }


def sources_hash(csrc: Path) -> str:
    """Hash of the library's sources and headers (content only, no flags). The loader compares it with a prebuilt
    library's to notice sources edited since that library was built."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(csrc).rglob("*") if p.is_file()):
        if "tools" in path.relative_to(csrc).parts:  # the profiling driver is not in the library
            continue
        digest.update(str(path.relative_to(csrc)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def find_cuda_home() -> str | None:
    """The CUDA toolkit root. Honours CUDA_HOME / CUDA_PATH; otherwise asks nvcc where it really lives (nvcc on
    PATH may be a wrapper script, in which case torch's own guess, dirname(dirname(which nvcc)), is wrong)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return root
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda")
        return str(default) if (default / "bin" / "nvcc").exists() else None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
        if match:
            return str(Path(match.group(1)).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        pass
    return str(Path(nvcc).resolve().parent.parent)


def _nvcc(cuda_home: str) -> str:
    return str(Path(cuda_home) / "bin" / "nvcc")


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([_nvcc(cuda_home), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def nvcc_archs(cuda_home: str) -> list[str]:
    """Compute capabilities nvcc can target, as "8.0"-style strings."""
    try:
        out = subprocess.run([_nvcc(cuda_home), "--list-gpu-arch"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    archs = []
    for digits in re.findall(r"compute_(\d+)", out):
        archs.append(f"{digits[:-1]}.{digits[-1]}")
    return archs


def resolve_arch_list(cuda_home: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST when set; else DEFAULT_ARCHS clamped to nvcc's list, PTX for the newest."""
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if requested:
        return [a for a in re.split(r"[;\s,]+", requested.strip()) if a]
    supported = set(nvcc_archs(cuda_home))
    archs = [a for a in DEFAULT_ARCHS if a in supported] or sorted(supported, key=float)[-1:]
    if archs:
        archs[-1] += "+PTX"
    return archs


def decide_cuda(cuda_home: str | None) -> tuple[bool, str]:
    """Whether to build the CUDA library, from the toolkit and torch.version.cuda (never from a visible GPU)."""
    import torch

    flag = os.environ.get("DEEPATLAS_CUDA", "").strip()
    if flag == "0":
        return False, "DEEPATLAS_CUDA=0"
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if cuda_home is None:
        missing.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if flag == "1" and missing:
        raise RuntimeError("DEEPATLAS_CUDA=1 but the CUDA library cannot be built: " + "; ".join(missing))
    if missing:
        return False, "; ".join(missing)
    return True, f"nvcc in {cuda_home}, torch CUDA {torch.version.cuda}"


def default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available_kb = int(re.search(r"MemAvailable:\s+(\d+)", meminfo).group(1))
        by_memory = int(available_kb / (NVCC_JOB_GB * 1024 * 1024))
    except (OSError, AttributeError):
        by_memory = cores
    return max(1, min(cores, by_memory))


def build_params(csrc: Path | None = None) -> BuildParams:
    csrc = Path(csrc) if csrc is not None else Path(__file__).resolve().parent.parent / "csrc"
    debug = os.environ.get("DEEPATLAS_DEBUG", "0") == "1"
    sanitize = os.environ.get("DEEPATLAS_SANITIZE", "0") == "1"
    cuda_home = find_cuda_home()
    # The sanitizers instrument host code only: a sanitized build is CPU-only.
    with_cuda, reason = (False, "DEEPATLAS_SANITIZE=1") if sanitize else decide_cuda(cuda_home)
    archs = resolve_arch_list(cuda_home) if with_cuda else []
    if debug:
        opt = ["-O0", "-g"]
    elif sanitize:
        opt = ["-O1"]  # the level the sanitizer docs recommend: usable speed, reports that point at the source
    else:
        # -g0 cancels the -g that setup.py inherits from Python's own CFLAGS: debug information made the CPU library
        # 38 MB instead of 6 and its compile a third slower, and never changes the code generated.
        opt = ["-O3", "-DNDEBUG", "-g0"]
    sanitizer = list(SANITIZE_FLAGS) if sanitize else []
    native = list(NATIVE_FLAGS) if os.environ.get("DEEPATLAS_NATIVE", "0") == "1" else []
    # The AVX2 copies of the CPU loops cost about two thirds more host compile time; builds that only prove the
    # build path (CI's wheel and JIT checks) leave them out.
    avx2 = [] if os.environ.get("DEEPATLAS_CPU_AVX2", "1") != "0" else ["-DDEEPATLAS_NO_AVX2_COPIES"]
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it g++ turns the selects of
    # the sampler's coordinate code back into branches and does not vectorise the CPU row loops (cpu/sample_rows.h).
    cxx = ["-fopenmp", "-fno-trapping-math", *opt, *native, *avx2, *sanitizer]
    nvcc = ["-G", "-g"] if debug else ["-O3", "-DNDEBUG", "-lineinfo"]
    return BuildParams(
        csrc=csrc,
        with_cuda=with_cuda,
        cuda_reason=reason,
        cuda_home=cuda_home if with_cuda else None,
        cuda_version=nvcc_version(cuda_home) if with_cuda else None,
        arch_list=archs,
        debug=debug,
        max_jobs=int(os.environ.get("MAX_JOBS") or default_max_jobs()),
        cxx_flags=cxx,
        nvcc_flags=nvcc,
        ld_flags=["-fopenmp", *sanitizer],
    )


def configure_torch_env(params: BuildParams) -> None:
    """Point torch.utils.cpp_extension at the right toolkit, arch list and job count (before or after import)."""
    os.environ.setdefault("MAX_JOBS", str(params.max_jobs))
    if not params.with_cuda:
        return
    os.environ["CUDA_HOME"] = params.cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(params.arch_list)
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = params.cuda_home


def installed_build_is_current(package_dir: Path) -> tuple[bool, str]:
    """Whether the prebuilt libraries in ``package_dir`` (an editable install of this checkout) were built from the
    current sources with the flags this environment would use, against the installed torch. scripts/setup_env.sh
    skips the (minutes-long) rebuild when they were."""
    import torch

    config_path = package_dir / "_build_config.json"
    if not config_path.exists():
        return False, "no prebuilt library"
    config = json.loads(config_path.read_text())
    params = build_params(package_dir.parent / "csrc")
    stems = ["_C", "_C_cuda"] if params.with_cuda else ["_C"]
    missing = [stem for stem in stems if not list(package_dir.glob(f"{stem}.*.so"))]
    if missing:
        return False, f"missing {', '.join(missing)}"
    if config.get("torch_version") != torch.__version__:
        return False, f"built for torch {config.get('torch_version')}, torch {torch.__version__} is installed"
    if config.get("source_hash") != params.source_hash():
        return False, "sources or build flags changed"
    return True, "sources, flags and torch unchanged"


if __name__ == "__main__":  # python deepatlas_cuda/_build.py --is-current: exit 0 when no rebuild is needed
    import importlib.util
    import sys

    if sys.argv[1:] != ["--is-current"]:
        sys.exit("usage: python deepatlas_cuda/_build.py --is-current")
    here = Path(__file__).resolve().parent
    spec = importlib.util.find_spec("deepatlas_cuda")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != here:
        current, why = False, f"deepatlas_cuda is not installed from {here}"
    else:
        current, why = installed_build_is_current(here)
    print(f"deepatlas_cuda build {'up to date' if current else 'needed'}: {why}")
    sys.exit(0 if current else 1)
