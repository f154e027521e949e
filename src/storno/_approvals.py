"""Whether a run may take an operator's decision now: the app-side half of approvals.

An approval is an operator's decision that answers the wait that asked for it, so a decision
is refused while the run has no open ``ctx.wait_for_approval()``, unless its saga
declared ``early_approvals`` when the run started, and while an earlier decision is still on
its way to the run. The engine's half (which decision a wait takes) is in :mod:`storno._waits`.
"""

from __future__ import annotations

from storno._errors import RunNotFoundError, RunStateError
from storno._history import fold
from storno._model import ENDED_STATUSES, EventType, MessageKind
from storno._store import Store

__all__ = ["check_decision_wanted"]


async def check_decision_wanted(
    store: Store, run_id: str, what: str, digest: str | None = None
) -> str | None:
    """Raise why run ``run_id`` cannot take an ``what`` ("approval", "rejection") now; else
    return the digest of what the open wait asks to approve (``None``: it names nothing).
    ``digest``, if given, must be that digest: the operator decides what they were shown."""
    record = await store.get_run(run_id)
    if record is None:
        raise RunNotFoundError(run_id)
    if record.status in ENDED_STATUSES:
        raise RunStateError(
            f"run {run_id} has already ended ({record.status.value}); the {what} was not stored"
        )
    history = await store.history(run_id)
    recorded = fold(history)
    waits = [w for w in recorded.waits.values() if w.kind == "approval" and w.status == "waiting"]
    open_wait = bool(waits)
    early = bool(history and history[0].data.get("early_approvals"))
    if not open_wait and not early:
        raise RunStateError(
            f"run {run_id} is not waiting for an approval ({record.status.value}); an {what} "
            f"given before the run asks for one is refused, so that an early click cannot "
            f"decide a request that was not made yet. Give it once the run waits for "
            f"approval, or declare the saga with @storno.saga(early_approvals=True)"
        )
    ignored = {e.data.get("ignored_seq") for e in history if e.type is EventType.APPROVAL_IGNORED}
    for message in await store.inbox(run_id):
        if (
            message.kind is MessageKind.APPROVAL
            and message.seq not in recorded.consumed
            and message.seq not in ignored
        ):
            raise RunStateError(
                f"run {run_id} already has a decision on its way (given by "
                f"{message.meta.get('by')}); the {what} was not stored"
            )
    asked = waits[0].digest if waits else None
    if digest is not None and digest != asked:
        subject = waits[0].subject if waits else None
        raise RunStateError(
            f"run {run_id} asks to approve {subject!r} (digest {asked}), not what the {what} "
            f"was given for (digest {digest}); look at the run again and decide on what it asks"
        )
    return asked
