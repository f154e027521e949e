"""An application's registry: the sagas its workers run and the steps its plans may use.

A saga or step is found by name; a step that is not registered (a compensation resumed after a
restart, say) is found again through the reference its history recorded (``module:qualname``).
"""

from __future__ import annotations

import sys
from typing import Any

from storno._definitions import Step
from storno._errors import ConfigurationError
from storno._plan import PLAN_SAGA_NAME, plan_saga
from storno._saga import Saga

__all__ = ["Registry"]


class Registry:
    """Sagas and steps by name, and the saga that runs plans made of the steps."""

    def __init__(self) -> None:
        self._sagas: dict[str, Saga[..., Any]] = {}
        self._steps: dict[str, Step[..., Any]] = {}
        self.plan_saga = plan_saga(self._steps.get)

    def lookup_step(self, name: str) -> Step[..., Any] | None:
        """A registered step by name, or ``None``."""
        return self._steps.get(name)

    def register(self, *items: Saga[..., Any] | Step[..., Any]) -> None:
        """Make sagas runnable by this application's workers, and steps usable in plans."""
        for item in items:
            if isinstance(item, Saga):
                item = item.declared  # a per-start options() copy must not replace it
                table: dict[str, Any] = self._sagas
            elif isinstance(item, Step):
                table = self._steps
            else:
                raise ConfigurationError(
                    f"register() takes sagas and steps made with @storno.saga / @storno.step, "
                    f"got {item!r}"
                )
            known = table.get(item.name)
            if known is not None and known.fn is not item.fn:
                raise ConfigurationError(
                    f"two different functions are registered as {item.name!r} "
                    f"({known.fn.__module__}.{known.fn.__qualname__} and "
                    f"{item.fn.__module__}.{item.fn.__qualname__}); give one a name= of its own"
                )
            table[item.name] = item

    @property
    def saga_names(self) -> list[str]:
        names = list(self._sagas)
        if self._steps:
            names.append(PLAN_SAGA_NAME)
        return names

    @property
    def steps(self) -> list[Step[..., Any]]:
        """The registered steps (those a plan may use), in the order they were registered."""
        return list(self._steps.values())

    @property
    def saga_limits(self) -> dict[str, int]:
        """``max_concurrent`` of the registered sagas that have one, by name."""
        return {n: s.max_concurrent for n, s in self._sagas.items() if s.max_concurrent}

    def find_saga(self, name: str) -> Saga[..., Any]:
        if name == PLAN_SAGA_NAME:
            return self.plan_saga
        try:
            return self._sagas[name]
        except KeyError:
            raise ConfigurationError(
                f"saga {name!r} is not registered with this application; pass it in "
                f"Storno(sagas=[...]) or app.register(...)"
            ) from None

    def find_step(self, name: str, ref: str | None) -> Step[..., Any]:
        """A registered step, else the step object the history's reference points at."""
        if name in self._steps:
            return self._steps[name]
        if ref:
            module_name, _, qualname = ref.partition(":")
            found: Any = sys.modules.get(module_name)
            for part in qualname.split("."):
                found = getattr(found, part, None)
            if isinstance(found, Step) and found.name == name:
                return found
            if found is not None and getattr(found, "__name__", None) == name:
                # The reference names the function; the Step wrapping it is what we need.
                for value in vars(sys.modules[module_name]).values():
                    if isinstance(value, Step) and value.fn is found:
                        return value
        raise ConfigurationError(
            f"step {name!r} is not registered with this application and cannot be found "
            f"(recorded as {ref!r}); register it with Storno(steps=[...]) or import its module "
            f"in the worker"
        )
