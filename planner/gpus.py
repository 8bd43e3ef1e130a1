"""GPU datasheet numbers: memory and dense (no structured sparsity) bf16 tensor-core peak.

Memory is the datasheet's decimal GB (80 GB = 80e9 bytes). The usable memory torch reports is
a little larger for HBM parts (an "80GB" H100 shows ~79.2 GiB = 85.0e9 bytes), so this errs on
the side of fitting less.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.errors import UserError

GB = 10**9
TFLOPS = 10**12


@dataclass(frozen=True)
class Gpu:
    """One accelerator: datasheet memory (bytes) and dense bf16 peak (FLOP/s)."""

    name: str
    memory_bytes: int
    peak_bf16_flops: float
    source: str


GPUS: tuple[Gpu, ...] = (
    Gpu("H100-80GB-SXM", 80 * GB, 989.4 * TFLOPS,
        "https://www.nvidia.com/en-us/data-center/h100/ (BF16 1,979 TFLOPS with sparsity; half dense)"),
    Gpu("H100-80GB-PCIe", 80 * GB, 756.5 * TFLOPS,
        "https://www.nvidia.com/en-us/data-center/h100/ (BF16 1,513 TFLOPS with sparsity; half dense)"),
    Gpu("H200-141GB", 141 * GB, 989.4 * TFLOPS,
        "https://www.nvidia.com/en-us/data-center/h200/ (SXM: BF16 1,979 TFLOPS with sparsity)"),
    Gpu("A100-80GB", 80 * GB, 312 * TFLOPS,
        "https://www.nvidia.com/en-us/data-center/a100/ (BF16 312 TFLOPS dense, 624 sparse)"),
    Gpu("A100-40GB", 40 * GB, 312 * TFLOPS,
        "https://www.nvidia.com/en-us/data-center/a100/ (BF16 312 TFLOPS dense, 624 sparse)"),
    Gpu("L40S", 48 * GB, 362.05 * TFLOPS,
        "https://www.nvidia.com/en-us/data-center/l40s/ (BF16 362.05 TFLOPS dense, 733 sparse)"),
    Gpu("L4", 24 * GB, 121 * TFLOPS,
        "https://www.nvidia.com/en-us/data-center/l4/ (BF16 242 TFLOPS with sparsity; half dense)"),
    Gpu("RTX-4090", 24 * GB, 165.2 * TFLOPS,
        "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: BF16 tensor, FP32 accumulate, dense"),
    Gpu("MI300X", 192 * GB, 1307.4 * TFLOPS,
        "https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html (BF16 dense)"),
)

# Short names users type, normalised like `_key` does.
_ALIASES = {"h100": "H100-80GB-SXM", "h100sxm": "H100-80GB-SXM", "h100pcie": "H100-80GB-PCIe",
            "h200": "H200-141GB", "a100": "A100-80GB", "4090": "RTX-4090", "rtx4090": "RTX-4090"}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_BY_KEY = {_key(g.name): g for g in GPUS} | {_key(a): next(g for g in GPUS if g.name == n) for a, n in _ALIASES.items()}


def gpu_names() -> list[str]:
    return [g.name for g in GPUS]


def get_gpu(name: str) -> Gpu:
    """A GPU by name, ignoring case, spaces and dashes (`h100`, `A100-40GB`, `rtx 4090`).

    Raises:
        UserError: unknown GPU, with the list of known ones.
    """
    gpu = _BY_KEY.get(_key(name))
    if gpu is None:
        raise UserError(f"Unknown GPU {name!r}: use one of {', '.join(gpu_names())}.")
    return gpu


# torch.cuda.get_device_name() spellings -> catalog names, most specific first ("NVIDIA H100 80GB
# HBM3" is the SXM part; the PCIe card reports "NVIDIA H100 PCIe"; A100s report their memory).
_DEVICE_NAMES = ((("h100", "pcie"), "H100-80GB-PCIe"), (("h100",), "H100-80GB-SXM"), (("h200",), "H200-141GB"),
                 (("a100", "40gb"), "A100-40GB"), (("a100",), "A100-80GB"), (("l40s",), "L40S"), (("l4",), "L4"),
                 (("rtx4090",), "RTX-4090"), (("mi300x",), "MI300X"))


def device_gpu(device_name: str) -> Gpu | None:
    """The catalog GPU a device reports itself as (`torch.cuda.get_device_name`), or None if unknown."""
    key = _key(device_name)
    for tokens, name in _DEVICE_NAMES:
        if all(token in key for token in tokens):
            return get_gpu(name)
    return None
