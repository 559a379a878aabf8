"""Pruning schedules: at which optimizer steps to prune, and how far towards the final target.

A schedule is a list of :class:`Event` (step, progress); ``progress`` in (0, 1] is the fraction of the final
target reached after that event. Steps are optimizer steps (``TrainerState.global_step``); an event at step ``s``
runs after ``s`` optimizer steps (step 0 = before training starts).

* ``oneshot``: one event at ``start_step`` (progress 1), then recovery.
* ``iterative``: equal increments at ``frequency`` (every N steps, or ``"epoch"`` boundaries) from
  ``start_step`` to ``end_step`` inclusive.
* ``cubic``: gradual pruning of Zhu & Gupta (2017), "To prune, or not to prune": progress
  ``1 - (1 - (t - t0) / (t1 - t0))**3`` every ``frequency`` steps; fast early, gentle near the end.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    step: int
    progress: float


def resolve_window(
    schedule: str,
    max_steps: int,
    steps_per_epoch: int,
    start_step: int | None = None,
    end_step: int | None = None,
    start_epoch: float | None = None,
    end_epoch: float | None = None,
) -> tuple[int, int]:
    """The pruning window in optimizer steps. Epochs, when given, are converted with ``steps_per_epoch``.

    Default window: ``[0, max_steps // 2]`` so the second half of training recovers from the last removal.
    """
    start = start_step if start_step is not None else 0
    if start_epoch is not None:
        start = round(start_epoch * steps_per_epoch)
    if end_step is not None:
        end = end_step
    elif end_epoch is not None:
        end = round(end_epoch * steps_per_epoch)
    else:
        end = start if schedule == "oneshot" else max(start, max_steps // 2)
    if not 0 <= start <= end:
        raise ValueError(f"pruning window is empty: start step {start} > end step {end}")
    if start > max_steps:
        raise ValueError(f"pruning starts at step {start} but training has only {max_steps} steps")
    return start, min(end, max_steps)


def build_events(schedule: str, start: int, end: int, frequency: int | str, steps_per_epoch: int) -> list[Event]:
    """Events of ``schedule`` in ``[start, end]`` (see module docstring)."""
    if schedule == "oneshot":
        return [Event(start, 1.0)]
    every = steps_per_epoch if frequency == "epoch" else int(frequency)
    if every < 1:
        raise ValueError(f"pruning frequency must be >= 1 step, got {frequency!r}")
    steps = list(range(start, end + 1, every))
    if steps[-1] != end:
        steps.append(end)
    if schedule == "iterative":
        n = len(steps)
        return [Event(s, (i + 1) / n) for i, s in enumerate(steps)]
    if schedule == "cubic":
        span = max(1, end - start)
        events = []
        for s in steps:
            progress = 1.0 - (1.0 - (s - start) / span) ** 3
            if progress > 0:
                events.append(Event(s, progress))
        if not events or events[-1].progress < 1.0:
            events.append(Event(end, 1.0))
        return events
    raise ValueError(f"unknown schedule {schedule!r}; allowed: oneshot, iterative, cubic")
