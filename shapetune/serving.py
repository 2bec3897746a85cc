"""The rule that serves a tuned kernel instead of the vendor path, on the bottom floor: the registry
(kernels.registry) serves by it, and tuning (scheduler.task_scheduler) judges a task's time by it."""

from __future__ import annotations

from shapetune.records import VendorBaseline

# A tuned kernel is served only if tuned_us * (1 + MARGIN) <= vendor_us, both timed in one run.
# Why 5%: above the run-to-run spread of one vendor op timed in two tuning runs (the H200 records
# under tuning_logs/: see BENCHMARKS.md, "Vendor timing noise"); a tuned kernel is kept only where
# it wins by more than that noise. (The few pairs far apart hold disturbed timings, see UNSTABLE.)
MARGIN = 0.05
# A vendor timing whose median is over UNSTABLE x its fastest sample was disturbed while it ran
# (1.5 lies in the gap between the undisturbed and the disturbed timings of the H200 tuning runs:
# see BENCHMARKS.md, "Vendor timing noise"). Its median is no yardstick; its
# fastest sample is (a lower bound on the vendor time, so a tuned kernel must beat even that).
UNSTABLE = 1.5


def vendor_us(b: VendorBaseline) -> float:
    """The time a vendor baseline stands for: its median, or its fastest sample where the median
    is over UNSTABLE x that (a disturbed timing)."""
    lat = b.latency
    return lat.median_us if lat.median_us <= UNSTABLE * lat.min_us else lat.min_us


def servable(tuned_us: float, yardstick_us: float) -> bool:
    """Whether a tuned time beats a vendor time (`vendor_us`) measured in the same run by MARGIN.
    (The run's fastest vendor timing: where a record first beats it, the tuner and reverify time
    the vendor path again in that run, so one outlier timing does not decide.)"""
    return tuned_us * (1 + MARGIN) <= yardstick_us
