"""Events: the broker protocol storno's outbox relay and consumers speak."""

from storno.events._protocol import HEADER_PREFIX, Broker, EventMessage, Received, Subscription

__all__ = ["HEADER_PREFIX", "Broker", "EventMessage", "Received", "Subscription"]
