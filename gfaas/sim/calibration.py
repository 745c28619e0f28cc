"""Default costs of the simulator, and where each number comes from.

All figures are for one V100-class GPU on PCIe 3.0 x16, the testbed of FaaSwap/
Torpor (RESEARCH.md); change them through `Calibration` and `DeviceProfile`.

* Host -> GPU link: 12 GB/s from pinned host memory (PCIe 3.0 x16 peaks at
  ~15.8 GB/s; pinned copies reach ~12). Torpor keeps models in a pinned host pool,
  so a swap-in is size / 12 GB/s plus a fixed 2 ms (allocation, copy launch,
  stream sync) -- ResNet-50's ~100 MB then swaps in ~10 ms.
* Exec time, batch 1: 3 ms + 40 ms per GB of weights, jittered by a factor
  lognormal(0, 0.2) per function. This puts ResNet-50 (~100 MB) at ~7 ms,
  ResNet-152 (~230 MB) at ~12 ms and BERT-large QA (~1.3 GB) at ~55 ms,
  the order of published V100 batch-1 numbers; a real deployment measures it.
* Interference: +20% exec time per co-running request (DeviceProfile). An
  assumption, not a measurement: batch-1 inference leaves most SMs idle, and
  FaST-GShare's 3.15x throughput from spatial sharing says co-running is
  cheap, but not free.
* SLOs: Torpor's p98 targets, 80 ms for vision-sized models and 200 ms for
  BERT-sized ones (>= 400 MB here), raised where needed to 1.5x the function's
  cold latency on an idle GPU so that every SLO is attainable.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.scheduling.base import DEFAULT_PROFILE, DeviceProfile


@dataclass(frozen=True, slots=True)
class Calibration:
    exec_base_s: float = 0.003
    exec_s_per_gb: float = 0.040
    slo_small_s: float = 0.080
    slo_large_s: float = 0.200
    large_model_bytes: int = 400_000_000
    cold_slack: float = 1.5
    device: DeviceProfile = DEFAULT_PROFILE

    def exec_s(self, model_bytes: int) -> float:
        return self.exec_base_s + self.exec_s_per_gb * model_bytes / 1e9

    def slo_s(self, model_bytes: int, exec_s: float) -> float:
        klass = self.slo_large_s if model_bytes >= self.large_model_bytes else self.slo_small_s
        cold = self.device.swap_s(model_bytes) + exec_s
        return max(klass, self.cold_slack * cold)


CALIBRATION = Calibration()
