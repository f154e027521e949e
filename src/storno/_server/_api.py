"""The HTTP API under ``/api/v1``: runs, signals, operator actions, dead letters, stuck runs,
the outbox and correlations.

Reading needs a read or operator token; anything that changes a run needs an operator token.
Actions are recorded in the run's history under the token's name (or ``by``, with the
token's name beside it), never under the token. The routes live by concern in
``_api_runs``, ``_api_actions``, ``_api_views``, ``_api_events`` and ``_api_webhooks``; this
module puts them together in the order they are matched.
"""

from __future__ import annotations

from fastapi import APIRouter

from storno._server import _api_actions, _api_events, _api_runs, _api_views, _api_webhooks
from storno._server._api_common import error_responses

__all__ = ["router", "webhook_router"]

router = APIRouter(prefix="/api/v1", responses=error_responses(400, 413, 422))
router.include_router(_api_runs.router)
router.include_router(_api_actions.router)
# After every route with a suffix: ``/runs/{run_id:path}`` would take them.
router.include_router(_api_runs.detail_router)
router.include_router(_api_views.router)
router.include_router(_api_events.router)

webhook_router = _api_webhooks.router
