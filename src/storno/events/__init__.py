"""Events: the broker protocol storno's outbox relay and consumers speak.

Adapters, imported by their own module: ``storno.events.nats`` (NATS JetStream,
``storno[nats]``) and ``storno.events.rabbitmq`` (RabbitMQ, ``storno[rabbitmq]``).
"""

from storno.events._protocol import HEADER_PREFIX, Broker, EventMessage, Received, Subscription

__all__ = ["HEADER_PREFIX", "Broker", "EventMessage", "Received", "Subscription"]
