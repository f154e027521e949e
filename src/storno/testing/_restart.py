"""Standing in for a process restart after a simulated crash: a worker under the same id."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storno._app import Storno
    from storno._worker import Worker

__all__ = ["restart_worker", "restart_workers"]


async def restart_worker(worker: Worker, *, grace: float = 10.0) -> Worker:
    """Stand in for restarting a worker's process after a :class:`SimulatedCrash`.

    Stops ``worker`` (its other runs get ``grace`` seconds to finish, then are handed back)
    and starts a new worker for the same application with the same ``worker_id``, which
    resumes the runs its predecessor held at once. Returns the new worker; the application
    stops it when it closes.
    """
    app = worker.app
    await worker.stop(grace=grace)
    successor = app.worker(
        worker_id=worker.id, concurrency=worker.concurrency, poll_interval=worker.poll_interval
    )
    await successor.start()
    return successor


async def restart_workers(app: Storno, *, grace: float = 10.0) -> list[Worker]:
    """:func:`restart_worker` for every worker running in ``app``: a process restart."""
    workers = app.workers
    for worker in workers:
        await worker.stop(grace=grace)
    successors = []
    for worker in workers:
        successor = app.worker(
            worker_id=worker.id, concurrency=worker.concurrency, poll_interval=worker.poll_interval
        )
        await successor.start()
        successors.append(successor)
    return successors
