"""Searches on a Ray cluster: map a function over items as Ray tasks, with retries and a progress bar.

The budget search (``Budget(executor="ray")``), ``nnforge bench --zoo --ray`` and ``python -m
nnforge.conformance --ray`` fan out with ``map_items``. Ray schedules; nnforge only submits one task per
item and collects each item's result once, by its position: a worker process that dies is retried by
Ray (``max_retries``), so no item is lost and none is counted twice.

Which cluster: the one ``ray.init`` already joined in this process, else ``address`` (``"ray"`` alone
means ``$RAY_ADDRESS`` or, without it, a local cluster of this machine's CPUs, started here and stopped
at exit by Ray).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import NnforgeError

RETRIES = 3  # times Ray runs a task again after its worker died
SERIAL = (None, "", "serial")


def wants_ray(executor: str | None) -> bool:
    """True for ``executor`` "ray" or a Ray address, and for None once the user ran ``ray.init`` here."""
    if executor in SERIAL:
        return executor is None and "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return True


def _ray():
    try:
        import ray
    except ImportError:
        raise NnforgeError("the Ray executor needs Ray: pip install ray") from None
    return ray


def _same_nnforge() -> dict:
    """Ray workers import the nnforge this process runs (a checkout, not only an installed copy)."""
    root = str(Path(__file__).resolve().parent.parent)
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}


def start_local(num_cpus: int | None = None, object_store_mb: int = 200):
    """A Ray cluster on this machine with ``num_cpus`` workers at once (default: every CPU)."""
    ray = _ray()
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env=_same_nnforge(),
    )
    return ray


def connect(executor: str | None = "ray"):
    """The ``ray`` module, joined to a cluster (see the module docstring)."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = None if executor in (*SERIAL, "ray") else str(executor).removeprefix("ray:")
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address is None:
            return start_local()
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise NnforgeError(f"cannot join the Ray cluster at {address or 'a new local one'}: {e}") from None
    return ray


def map_items(
    fn: Callable,
    items: Sequence,
    label: str = "tasks",
    executor: str | None = "ray",
    progress: bool = True,
    describe: Callable[[object], str] = str,
    num_cpus: float = 1,
    max_retries: int = RETRIES,
    skip: Callable[[int], bool] | None = None,
    on_result: Callable[[int, object], None] | None = None,
) -> list:
    """``[fn(item) for item in items]``, each call a Ray task; results in the order of ``items``.
    An exception ``fn`` raises is raised here (Ray retries only tasks whose worker died).

    ``skip(k)``: asked just before item ``k`` is submitted, in order; True leaves it out (its result is None).
    Then only as many tasks as the cluster has CPUs are in flight, so that ``on_result(k, result)``, called as
    each result arrives, can make later items skippable (the budget search's pruning)."""
    if not items:
        return []
    ray = connect(executor)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def call(item):  # ray.remote takes functions only (not a functools.partial)
        return fn(item)

    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(call)
    window = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus)) if skip else len(items)
    results: list = [None] * len(items)
    position: dict = {}
    columns = (TextColumn(f"[bold]{label} on Ray"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"))
    with Progress(
        *columns, TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=not progress
    ) as bar:
        bar_task = bar.add_task("", total=len(items))
        upcoming, pending = iter(range(len(items))), []
        while True:
            for k in upcoming:  # top up the tasks in flight
                if skip is not None and skip(k):
                    bar.update(bar_task, advance=1, description=f"{describe(items[k])}: skipped")
                    continue
                ref = task.remote(items[k])
                position[ref] = k
                pending.append(ref)
                if len(pending) >= window:
                    break
            if not pending:
                break
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                k = position.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # fn raised: the caller's exception, as if run here
                    raise e.as_instanceof_cause() from None
                except ray.exceptions.RayError as e:  # out of retries, or the cluster went away
                    raise NnforgeError(f"{label}: {describe(items[k])} failed on Ray: {e}") from None
                if on_result is not None:
                    on_result(k, results[k])
                bar.update(bar_task, advance=1, description=describe(items[k]))
    return results
