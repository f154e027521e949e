"""Events: the transactional outbox's relay, ``storno.on`` handlers, and the broker protocol.

The adapters are modules of their own, each behind its extra: ``storno.events.nats``
(``storno[nats]``, JetStream) and ``storno.events.rabbitmq`` (``storno[rabbitmq]``).
"""

from storno.events._consumers import Handler, Signal, Start, handled_run_id, on, signal, start
from storno.events._memory import MemoryBroker
from storno.events._protocol import HEADER_PREFIX, Broker, EventMessage, Received, Subscription
from storno.events._relay import Relay, RelayCounts

__all__ = [
    "on",
    "start",
    "signal",
    "Handler",
    "Start",
    "Signal",
    "handled_run_id",
    "Relay",
    "RelayCounts",
    "Broker",
    "Subscription",
    "Received",
    "EventMessage",
    "HEADER_PREFIX",
    "MemoryBroker",
]
