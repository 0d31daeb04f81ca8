"""Independent jobs of a build run one after another here, or as Ray tasks over a cluster's CPUs (`--ray`).

    jobs.map(job, items, shared) ─► [job(item, shared) for item in items]      (always in `items`' order)
        serial: here, in order
        Ray:    one task per item (1 CPU each), `shared` put in Ray's object store once; results gathered as
                they finish (`on_done`), returned in order

A job is a module-level function (Ray imports it by name in its workers, so lrdeploy must be installed on every
node) whose result depends on its arguments alone: the same code computes the same numbers in either place, and
ONNX Runtime's CPU kernels give the same bits at any thread count, so a build is byte-identical with and without
Ray. OpenBLAS does not (numpy's 0.3.31 splits a 64 × 32 × 256 product differently on 1 and 2 threads, and Ray
gives a one-CPU task one BLAS thread): a job's own numpy products run under `one_blas_thread()`, here as in a
task. Without `--ray` nothing of Ray is imported.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

from lrdeploy.errors import MissingDependencyError, OptionError

Item = TypeVar("Item")
Result = TypeVar("Result")


class SerialJobs:
    """Every job here, one after another."""

    workers = 1

    def threads(self, threads: int) -> int:
        """ONNX Runtime threads for one job: the build's own (0: all of this machine's)."""
        return threads

    def map(self, job: Callable[[Item, Any], Result], items: Sequence[Item], shared: Any = None,
            on_done: Callable[[Result], None] | None = None) -> list[Result]:
        results = []
        for item in items:
            results.append(job(item, shared))
            if on_done is not None:
                on_done(results[-1])
        return results


SERIAL = SerialJobs()


class RayJobs:
    """Every job a Ray task of one CPU, on the cluster `ray.init` connected to."""

    def __init__(self, ray: Any):
        self.ray = ray
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def threads(self, threads: int) -> int:
        """A task has one CPU: one ONNX Runtime thread unless the build asked for more."""
        return threads or 1

    def map(self, job: Callable[[Item, Any], Result], items: Sequence[Item], shared: Any = None,
            on_done: Callable[[Result], None] | None = None) -> list[Result]:
        task = self.ray.remote(num_cpus=1)(run_job)
        shared_ref = self.ray.put(shared)
        pending = {task.remote(job, item, shared_ref): index for index, item in enumerate(items)}
        results: list[Any] = [None] * len(items)
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = self.ray.get(ref)
                if on_done is not None:
                    on_done(results[index])
        return results


def run_job(job: Callable[[Item, Any], Result], item: Item, shared: Any) -> Result:
    """What a Ray task runs (Ray resolves `shared`'s object reference before the call)."""
    return job(item, shared)


Jobs = SerialJobs | RayJobs


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread for the products inside: the same bits here and in a one-CPU Ray task."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextmanager
def jobs_on(address: str | None, workers: int | None = None) -> Iterator[Jobs]:
    """Where this run's jobs go: here (`address` None), a local Ray started for the run and shut down after it
    ("auto", `workers` CPUs, by default this machine's; or the cluster RAY_ADDRESS names, where it is set), or the
    existing Ray cluster at `address` (host:port or ray://host:port). A Ray this process started already is used
    as it is."""
    if address is None:
        yield SERIAL
        return
    try:
        import ray
    except ImportError as error:
        raise MissingDependencyError("--ray needs Ray: pip install 'lrdeploy[ray]' (or leave --ray out to run "
                                     "here)") from error
    if ray.is_initialized():  # the caller's own Ray (a library user's ray.init): used, and left running
        yield RayJobs(ray)
        return
    local = address == "auto" and not os.environ.get("RAY_ADDRESS")
    try:
        if local:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        else:
            ray.init(address=None if address == "auto" else address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise OptionError(f"--ray {address}: no Ray cluster could be reached ({str(error).splitlines()[0]}); start one "
                          "with `ray start --head` and give its address, or pass --ray auto for a local one") from error
    try:
        yield RayJobs(ray)
    finally:
        ray.shutdown()
