"""pytest-benchmark suite: every case of cases.py, "ours" and "torch" side by side (one benchmark group per case).

    pytest benchmarks -m "not slow"                        # timings, grouped by case
    pytest benchmarks -m "not slow" --benchmark-disable    # smoke run: each case once, untimed
    BENCH_ROUNDS=10 pytest benchmarks -k "warp and C1"

CUDA cases are collected only when torch.cuda.is_available() (marked `cuda`; the timed function synchronises);
the 160x192x224 cases are marked `slow`.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

import cases

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def _params():
    params = []
    for case in cases.all_cases(devices=cases.available_devices()):
        marks = []
        if case.slow:
            marks.append(pytest.mark.slow)
        if case.device == "cuda":
            marks.append(pytest.mark.cuda)
        for impl in cases.IMPLS:
            impl_marks = list(marks)
            if impl == "ours" and not cases.ours_supported(case.device):
                impl_marks.append(pytest.mark.skip(reason="this deepatlas_cuda build has no CUDA kernels"))
            params.append(pytest.param(case, impl, marks=impl_marks, id=f"{case.id}-{impl}"))
    return params


_INPUTS: dict = {}  # the current case's inputs only: ours and torch of a case run back to back on the same tensors


def _inputs(case):
    if case not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _INPUTS[case] = cases.make_inputs(case)
    return _INPUTS[case]


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    _INPUTS.clear()


@pytest.mark.parametrize(("case", "impl"), _params())
def test_sampler(benchmark, case, impl):
    run = cases.make_runner(case, impl, _inputs(case))
    benchmark.group = case.id
    benchmark.extra_info.update(op=case.op, impl=impl, shape=list(case.shape), channels=case.channels,
                                variant=case.variant, device=case.device, threads=torch.get_num_threads(),
                                floor_bytes=cases.case_floor_bytes(case))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
