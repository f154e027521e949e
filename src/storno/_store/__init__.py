"""The journal: where runs and their append-only histories are kept."""

from storno._store._base import NewRun, RunExistsError, RunUpdate, Store
from storno._store._factory import open_store

__all__ = ["NewRun", "RunExistsError", "RunUpdate", "Store", "open_store"]
