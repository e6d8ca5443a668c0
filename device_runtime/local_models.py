"""The custom model factories this machine's operator allows: no code named by data.

A ``ModelConfig`` reaches a machine from places nobody there wrote: the job's plan
and tasks (MQTT, shared brokers), checkpoints and artifacts (files). Such a config
may name a zoo architecture only (``cnn1d``, ``cnn2d``, ``cnn-wide``, SplitMix
bases of one). Arch ``"custom"`` names a Python callable, and importing its module
runs code; so a custom model is built only when the operator named that exact
factory on this machine (``--allow-custom-model module:callable``, or the device
config's ``allow_custom_model``), and the check comes before anything is imported.

The allowed entry also fixes the factory's keyword arguments: ``module:callable``
allows it with none, ``module:callable={"hidden": 64}`` with exactly those. A
config whose ``kwargs`` differ from the entry's is refused, so a message can
neither choose the factory nor parameterize it. (``input_shape`` and
``num_classes`` are passed as for the zoo's models: the data decides them.)

Torch-free: the device agent checks a plan's model here before it keeps the plan.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from device_runtime.errors import AllowSpecError, ModelNotAllowedError

FLAG = "--allow-custom-model"


def _canonical(kwargs: object) -> str | None:
    """The kwargs as sorted JSON, or None if they are not a JSON object."""
    if not isinstance(kwargs, dict):
        return None
    try:
        return json.dumps(kwargs, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return None


def parse_spec(spec: str, flag: str = FLAG) -> tuple[str, str]:
    """``module:callable`` or ``module:callable={json}`` -> (factory, kwargs as sorted
    JSON); a malformed one is an AllowSpecError naming it."""
    factory, sep, raw = spec.partition("=")
    mod, colon, fn = factory.partition(":")
    if not (colon and mod and fn and all(p.isidentifier() for p in mod.split("."))
            and fn.isidentifier()):
        raise AllowSpecError(f"{flag}: expected module:callable[={{json kwargs}}], got {spec!r}")
    kwargs: object = {}
    if sep:
        try:
            kwargs = json.loads(raw)
        except json.JSONDecodeError as e:
            raise AllowSpecError(f"{flag} {factory}: kwargs are not JSON: {e}") from None
    canonical = _canonical(kwargs)
    if canonical is None:
        raise AllowSpecError(f"{flag} {factory}: kwargs: expected a JSON object, got {raw!r}")
    return factory, canonical


@dataclass(frozen=True)
class LocalModels:
    """The allowlist: (factory, kwargs as sorted JSON) pairs, one per factory. Empty
    (the default everywhere) refuses every custom model."""

    entries: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, specs: Iterable[str] | None, flag: str = FLAG) -> "LocalModels":
        """From ``--allow-custom-model`` values (or the device config's list)."""
        entries: dict[str, str] = {}
        for spec in specs or ():
            factory, kwargs = parse_spec(spec, flag)
            if entries.get(factory, kwargs) != kwargs:
                raise AllowSpecError(f"{flag} {factory}: given twice with different kwargs")
            entries[factory] = kwargs
        return cls(tuple(sorted(entries.items())))

    @property
    def factories(self) -> list[str]:
        return [f for f, _ in self.entries]

    def specs(self) -> list[str]:
        """The entries as ``parse`` takes them (to hand to another process)."""
        return [f if k == "{}" else f"{f}={k}" for f, k in self.entries]

    def kwargs_for(self, factory: str) -> dict | None:
        """The kwargs the operator fixed for ``factory``; None if it is not allowed."""
        found = dict(self.entries).get(factory)
        return None if found is None else json.loads(found)

    def check(self, arch: object, factory: object, kwargs: object) -> None:
        """Raise ModelNotAllowedError unless a config with these fields may be built
        here: any non-custom arch passes (the builder knows only the zoo's)."""
        if arch != "custom":
            return
        name = factory if isinstance(factory, str) else repr(factory)
        allowed = dict(self.entries).get(name)
        if allowed is None:
            raise ModelNotAllowedError(
                f"custom model factory {name!r} is not allowed here (a model config "
                f"from a plan, task, checkpoint or artifact may name a zoo architecture "
                f"only); to build it, name it on this machine: {FLAG} {name}")
        if _canonical(kwargs) != allowed:
            raise ModelNotAllowedError(
                f"custom model factory {name!r}: kwargs {_show(kwargs)} are not the "
                f"allowed {allowed} (a model config cannot parameterize a local factory; "
                f"{FLAG} {name}={{...}} fixes them)")

    def check_json(self, config: object) -> None:
        """``check`` on a config still in its JSON form (a plan's or task's ``model``)."""
        if isinstance(config, dict):
            self.check(config.get("arch"), config.get("factory"), config.get("kwargs", {}))


def _show(kwargs: object) -> str:
    text = _canonical(kwargs) or repr(kwargs)
    return text if len(text) <= 80 else text[:77] + "..."


NO_CUSTOM = LocalModels()
