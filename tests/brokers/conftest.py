"""Fixtures for the broker tests: real servers only, named by STORNO_TEST_NATS_URL and
STORNO_TEST_RABBITMQ_URL. Where a variable is unset its tests skip and say so
(``--require-brokers`` makes that a failure); each test's kit creates its own stream or
exchange and queues, and deletes them afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from brokers.kit import BrokerKit
from conftest import broker_url


@pytest.fixture
def nats_url() -> str:
    return broker_url("nats")


@pytest.fixture
def rabbitmq_url() -> str:
    return broker_url("rabbitmq")


@pytest.fixture
async def nats_kit(nats_url: str) -> AsyncIterator[BrokerKit]:
    kit = BrokerKit("nats", nats_url)
    try:
        yield kit
    finally:
        await kit.cleanup()


@pytest.fixture
async def rabbitmq_kit(rabbitmq_url: str) -> AsyncIterator[BrokerKit]:
    kit = BrokerKit("rabbitmq", rabbitmq_url)
    try:
        yield kit
    finally:
        await kit.cleanup()


@pytest.fixture(
    params=[
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    ]
)
def kit(request: pytest.FixtureRequest) -> BrokerKit:
    """Either broker's kit: a test taking ``kit`` runs once on NATS and once on RabbitMQ."""
    chosen: BrokerKit = request.getfixturevalue(f"{request.param}_kit")
    return chosen
