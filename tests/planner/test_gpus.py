import pytest

from data.errors import UserError
from planner.gpus import get_gpu


@pytest.mark.parametrize(
    "name, memory_gb, peak_tflops",
    [("H100", 80, 989.4), ("h100-80gb-sxm", 80, 989.4), ("H200", 141, 989.4), ("A100-40GB", 40, 312),
     ("a100", 80, 312), ("L40S", 48, 362.05), ("L4", 24, 121), ("rtx 4090", 24, 165.2), ("MI300X", 192, 1307.4)],
)
def test_catalog(name, memory_gb, peak_tflops):
    gpu = get_gpu(name)
    assert gpu.memory_bytes == memory_gb * 10**9
    assert gpu.peak_bf16_flops == pytest.approx(peak_tflops * 1e12)


def test_unknown_gpu_lists_names():
    with pytest.raises(UserError, match="H100-80GB-SXM.*MI300X"):
        get_gpu("TPU-v5")
