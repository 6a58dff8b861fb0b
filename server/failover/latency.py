"""What the cloud's first-token latency has been: sliding windows, pure (the clock is passed in).

Called on the event loop by the race executor (``server.failover.race``), which records one
observation per cloud attempt that got far enough to be timed, and read by the planner
(``server.failover.planner``) for deadlines and the slow verdict.

An observation is the time from sending the request to the first *content* token of a stream
(role-only chunks, comments and keep-alives do not count), or to the whole answer of a
non-streamed request. When the local answer won a race, the cloud's latency is unknown but at
least the time the race lasted: it is recorded as *censored* (a lower bound). Deadlines use only
uncensored observations (a hang must not teach the deadline to wait longer); the slow verdict
uses both (a cloud that keeps losing races is slow).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Observation:
    at: float
    seconds: float
    censored: bool = False


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


@dataclass
class Window:
    """Observations younger than ``horizon_s``, at most ``max_samples`` of them (oldest dropped)."""

    horizon_s: float
    max_samples: int = 512
    _items: deque[Observation] = field(default_factory=deque)

    def add(self, obs: Observation) -> None:
        self._items.append(obs)
        if len(self._items) > self.max_samples:
            self._items.popleft()

    def values(self, now: float, censored: bool = True) -> list[float]:
        horizon = now - self.horizon_s
        items = self._items
        while items and items[0].at < horizon:
            items.popleft()
        return [o.seconds for o in items if censored or not o.censored]

    def last(self, n: int, now: float) -> list[float]:
        """The ``n`` most recent values still in the window (censored ones included), oldest first."""
        horizon = now - self.horizon_s
        out: list[float] = []
        for obs in reversed(self._items):
            if len(out) == n or obs.at < horizon:
                break
            out.append(obs.seconds)
        out.reverse()
        return out

    def clear(self) -> None:
        self._items.clear()


#: Deadlines learn from the last 10 minutes; the slow verdict compares the last ``slow_window_s``
#: with a baseline of the last hour.
DEADLINE_HORIZON_S = 600.0
BASELINE_HORIZON_S = 3600.0


class UpstreamLatency:
    """One upstream's first-token latencies: per (workload, streamed) for deadlines, and all its
    covered and uncovered traffic together for the slow verdict."""

    def __init__(self, slow_window_s: float) -> None:
        self._deadline: dict[tuple[str, bool], Window] = {}
        self.recent = Window(slow_window_s, 256)
        """Every observation (censored ones included) of the last ``slow_window_s``."""
        self.baseline = Window(BASELINE_HORIZON_S, 1024)
        """Uncensored observations made while the upstream was not judged slow."""

    def window(self, workload: str, streamed: bool) -> Window:
        key = (workload, streamed)
        window = self._deadline.get(key)
        if window is None:
            window = self._deadline[key] = Window(DEADLINE_HORIZON_S, 256)
        return window

    def record(self, workload: str | None, streamed: bool, obs: Observation, normal: bool) -> None:
        """``normal``: the breaker was closed (not slow), so the observation may join the baseline."""
        if workload is not None and not obs.censored:
            self.window(workload, streamed).add(obs)
        self.recent.add(obs)
        if normal and not obs.censored:
            self.baseline.add(obs)

    def reset_recent(self) -> None:
        """The upstream changed state (recovered, or opened): judge it afresh."""
        self.recent.clear()
