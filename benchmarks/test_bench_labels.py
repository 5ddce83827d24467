"""pytest-benchmark cases for the label, Dice and Jacobian ops (ours vs plain PyTorch); see report_labels.py."""

import pytest

import report_labels

SIZES = [pytest.param("64", id="64"), pytest.param("full", id="160x192x224", marks=pytest.mark.slow)]


@pytest.mark.parametrize("impl", ["ours", "torch"])
@pytest.mark.parametrize("case", report_labels.CASES)
@pytest.mark.parametrize("size", SIZES)
def test_label_ops(benchmark, case, impl, size):
    benchmark.group = f"{case}-{size}"
    inputs = report_labels.make_inputs(case, report_labels.cases.size_shape(size))
    benchmark.pedantic(report_labels.make_step(case, impl, inputs), rounds=3, warmup_rounds=1)
