"""Peak memory of a piece of work: CUDA ``max_memory_allocated``, or on the CPU the process's peak resident set
size (VmHWM), whose high-water mark Linux lets us reset by writing 5 to ``/proc/self/clear_refs``."""

from __future__ import annotations

import resource

import torch

MB = 2**20


class PeakMemory:
    """``reset()`` before a step and ``peak_mb()`` after it. On the CPU, when the high-water mark cannot be reset
    (not Linux, or /proc not writable) the numbers are the process's lifetime peak (``exact`` is False)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.exact = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.exact = False

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MB
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / MB
        except OSError:
            pass
        self.exact = False
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
