"""Structured logs: one line per durable event of a run, with its run id and step.

:class:`EventLog` is a listener (``app.add_listener``) that logs to ``storno.events``; each
record carries ``run_id``, ``saga``, ``event``, ``step``, ``position`` and ``attempt`` as
attributes, which :class:`JsonFormatter` writes as one JSON object per line. Request logs
(``storno.access``) name the path without its query string, so a token given as
``?token=`` never reaches a log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from storno._model import Event, EventType, RunRecord

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "AccessLog",
    "EventLog",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "escape_control",
]

_FIELDS = (
    "run_id",
    "saga",
    "event",
    "step",
    "position",
    "attempt",
    "status",
    "key",
    "error_type",
    "method",
    "path",
    "http_status",
    "duration_ms",
    "principal",
)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_") and value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control(text: str) -> str:
    """``text`` with control characters (newlines, escapes, line separators) written as
    ``\\n``, ``\\x1b`` ...: a message or value can then never start a log line of its own."""
    return _CONTROL.sub(
        lambda m: _NAMED.get(m.group(), m.group().encode("unicode_escape").decode()), text
    )


class TextFormatter(logging.Formatter):
    """``time level message key=value ...`` for people reading a terminal.

    Messages and values are escaped (:func:`escape_control`) and a traceback's lines are
    indented, so that text from a run (an error message, a step name) cannot forge a line.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {escape_control(record.getMessage())}"
        extra = [
            f"{name}={escape_control(str(getattr(record, name)))}"
            for name in _FIELDS
            if getattr(record, name, None) is not None and name not in ("event",)
        ]
        if extra:
            line = f"{line}  {' '.join(extra)}"
        details = []
        if record.exc_info:
            details.append(self.formatException(record.exc_info))
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        for text in details:
            line += "".join(f"\n    {escape_control(part)}" for part in text.splitlines())
        return line


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Log to stderr as ``text`` or ``json`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


_MESSAGES: dict[EventType, str] = {
    EventType.RUN_RESUMED: "run resumed from its history",
    EventType.STEP_STARTED: "step attempt started",
    EventType.STEP_COMPLETED: "step completed",
    EventType.ATTEMPT_FAILED: "step attempt failed",
    EventType.OUTCOME_UNKNOWN: "step outcome unknown",
    EventType.VERIFIED: "read-back answered",
    EventType.STEP_FAILED: "step gave up",
    EventType.RUN_COMPLETED: "run completed",
    EventType.COMPENSATION_STARTED: "compensation started",
    EventType.COMPENSATION_STEP_STARTED: "compensation attempt started",
    EventType.COMPENSATION_STEP_COMPLETED: "compensation completed",
    EventType.COMPENSATION_STEP_SKIPPED: "compensation skipped",
    EventType.COMPENSATION_ATTEMPT_FAILED: "compensation attempt failed",
    EventType.COMPENSATION_STEP_FAILED: "compensation gave up",
    EventType.RUN_COMPENSATED: "run compensated",
    EventType.RUN_COMPENSATION_FAILED: "run is a dead letter",
    EventType.RUN_NEEDS_ATTENTION: "run needs attention",
    EventType.RUN_WAITING: "run suspended",
    EventType.TIMER_STARTED: "durable sleep started",
    EventType.TIMER_FIRED: "durable sleep ended",
    EventType.SIGNAL_WAIT_STARTED: "waiting for a signal",
    EventType.SIGNAL_RECEIVED: "signal received",
    EventType.SIGNAL_TIMED_OUT: "signal wait timed out",
    EventType.CHILD_STARTED: "child run started",
    EventType.CHILD_ENDED: "child run ended",
    EventType.CANCEL_REQUESTED: "cancel requested",
    EventType.CANCEL_REFUSED: "cancel refused past the point of no return",
    EventType.RUN_CANCELLED: "run cancelled",
    EventType.OPERATOR_ACTION: "operator action",
    EventType.VALUE_RECORDED: "value recorded",
    EventType.EVENT_EMITTED: "event emitted",
}
_WARN = {
    EventType.ATTEMPT_FAILED,
    EventType.OUTCOME_UNKNOWN,
    EventType.COMPENSATION_ATTEMPT_FAILED,
    EventType.SIGNAL_TIMED_OUT,
}
_ERROR = {
    EventType.STEP_FAILED,
    EventType.COMPENSATION_STEP_FAILED,
    EventType.RUN_COMPENSATION_FAILED,
    EventType.RUN_NEEDS_ATTENTION,
}


class EventLog:
    """A listener that logs every durable event of the runs this process executes.

    Steps are named on every line of a step's events; a compensation's events name the step
    they undo. Values (arguments, results) are not logged: they may hold personal data.
    """

    def __init__(self, logger: logging.Logger | None = None, *, values: bool = False) -> None:
        self.log = logger or logging.getLogger("storno.events")
        self.names: dict[tuple[str, int], str] = {}
        self.values = values

    def __call__(self, record: RunRecord, events: list[Event]) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        for event in events:
            if event.type is EventType.VALUE_RECORDED:
                continue
            self._one(record, event)
        if any(e.type in _ENDS for e in events):
            for key in [k for k in self.names if k[0] == record.run_id]:
                del self.names[key]

    def _one(self, record: RunRecord, event: Event) -> None:
        d = event.data
        step = d.get("step") or d.get("saga")
        if event.position is not None:
            key = (record.run_id, event.position)
            if step:
                self.names[key] = str(step)
            else:
                step = self.names.get(key)
        if event.type in (EventType.SIGNAL_WAIT_STARTED, EventType.SIGNAL_RECEIVED):
            step = step or f"signal:{d.get('name')}"
        error = d.get("error") if isinstance(d.get("error"), dict) else None
        fields: dict[str, Any] = {
            "run_id": record.run_id,
            "saga": record.saga,
            "event": event.type.value,
            "step": step,
            "position": event.position,
            "attempt": d.get("attempt"),
            "key": d.get("key"),
            "error_type": (error or {}).get("type"),
        }
        level = (
            logging.ERROR
            if event.type in _ERROR
            else logging.WARNING
            if event.type in _WARN
            else logging.INFO
        )
        message = _MESSAGES.get(event.type, event.type.value)
        if error and error.get("message"):
            message = f"{message}: {error['message']}"
        elif event.type is EventType.OPERATOR_ACTION:
            message = f"{message}: {d.get('action')} by {d.get('by')}"
        elif event.type is EventType.EVENT_EMITTED:
            message = f"{message}: {d.get('topic')} as {d.get('event_id')}"
            fields["step"] = f"emit:{d.get('topic')}"
        if self.values and event.payload is not None:
            fields["value"] = event.payload[:500]
        self.log.log(level, message, extra=fields)


_ENDS = {
    EventType.RUN_COMPLETED,
    EventType.RUN_COMPENSATED,
    EventType.RUN_COMPENSATION_FAILED,
    EventType.RUN_NEEDS_ATTENTION,
    EventType.RUN_CANCELLED,
    EventType.RUN_WAITING,
}


class AccessLog:
    """Logs each request's method, path (without the query string), status and duration."""

    def __init__(self, app: ASGIApp, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.log = logger or logging.getLogger("storno.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            principal = scope.get("state", {}).get("principal_name")
            self.log.info(
                "%s %s %d",
                scope.get("method"),
                scope.get("path"),
                status,
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "http_status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    "principal": principal,
                },
            )
