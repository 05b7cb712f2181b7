"""The module registry: task names (`copy`, `ansible.builtin.copy`, `mesh.certificate`) to functions.
It owns naming and lookup; it must not run modules. `registry` is the one shared instance.

    from mesh.deploy.modules import register_module
    register_module("mesh.certificate", certificate, params={"proxy", "ttl"})
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mesh.deploy.modules.api import Module

BUILTIN_PREFIXES = ("ansible.builtin.", "ansible.legacy.")


@dataclass(frozen=True)
class ModuleSpec:
    """A registered module: its function and, when known, the arguments it accepts (checked at parse time)."""

    name: str
    run: Module
    params: frozenset[str] | None = None
    free_form: str | None = None  # the argument a bare string fills (`command: ls` -> cmd)


class ModuleRegistry:
    """Modules by name. Builtins answer to their short name and to `ansible.builtin.<name>`."""

    def __init__(self) -> None:
        self._specs: dict[str, ModuleSpec] = {}

    def register(self, name: str, run: Module, params: Iterable[str] | None = None,
                 free_form: str | None = None) -> None:
        """Add (or replace) a module; params lists its accepted arguments (None: any)."""
        self._specs[name] = ModuleSpec(name, run, frozenset(params) if params is not None else None, free_form)

    def resolve(self, name: str) -> ModuleSpec | None:
        """The module a task key names, or None."""
        if name in self._specs:
            return self._specs[name]
        for prefix in BUILTIN_PREFIXES:
            if name.startswith(prefix) and name[len(prefix):] in self._specs:
                return self._specs[name[len(prefix):]]
        return None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def copy(self) -> ModuleRegistry:
        """A registry with the same modules, to extend without touching this one (tests)."""
        other = ModuleRegistry()
        other._specs = dict(self._specs)
        return other


def _default_registry() -> ModuleRegistry:
    from mesh.deploy.modules.builtin import register_builtins

    made = ModuleRegistry()
    register_builtins(made)
    return made


registry = _default_registry()
register_module = registry.register
