"""Process memory readings (torch-free, so the device runtime shares them)."""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """Samples this process's resident set size in a background thread; `peak_mb` is the largest reading.

    Used as a context manager around work whose peak matters (a training run), since the kernel's own high-water
    mark (ru_maxrss) also counts earlier spikes such as loading a checkpoint.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.peak_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
