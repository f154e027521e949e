"""Broker adapter tests. A package, so that its conftest is ``brokers.conftest`` and does not
take the module name ``conftest`` from tests/conftest.py (``from conftest import ...``)."""
