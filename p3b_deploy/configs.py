"""Typed config dataclasses: one declaration per setting (default, help, CLI choices).

Every config (TrainConfig, P3BConfig, ExportConfig, RunConfig, ...) declares its fields with
`opt(default, help)`. The CLI builds its flags from these declarations (`p3b_deploy.cli.options`),
config files are read into the same classes, and the resolved config is saved next to the
artifact it produced. No torch import here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from .errors import P3BError

T = TypeVar("T", bound="ConfigBase")
_MISSING = dataclasses.MISSING


def opt(default: Any = _MISSING, help: str = "", *, factory: Any = _MISSING, choices: Sequence[str] | None = None,
        flag: str | None = None, cli: bool = True, metavar: str | None = None, const: Any = None) -> Any:
    """A dataclass field with its CLI declaration: help text, choices, flag name (default
    `--field-name`), whether the CLI exposes it at all, and `const`: the value of the bare flag
    (its argument is then optional, e.g. `--int8` = `--int8 dynamic`)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "cli": cli,
            "metavar": metavar, "const": const}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """P3BError naming the keys of `d` that are not fields of the dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise P3BError(f"unknown {what} key(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")


class ConfigBase:
    """dict round trip, strict construction from files, and `replace` that skips None values."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Build from a (file) dict; unknown keys are an error, not silently ignored."""
        check_fields(cls, d, "config")
        return cls(**d)

    def replace(self: T, **overrides: Any) -> T:
        """A copy with `overrides` applied (None values mean 'not given' and are skipped)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of config fields (a saved config.json's 'config' key also works)."""
    import yaml
    f = Path(path)
    if not f.is_file():
        raise P3BError(f"config file not found: {f}")
    try:
        d = yaml.safe_load(f.read_text())
    except yaml.YAMLError as e:
        raise P3BError(f"config file {f} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if isinstance(d, dict) and isinstance(d.get("config"), dict):
        d = d["config"]
    if not isinstance(d, dict):
        raise P3BError(f"config file {f} must hold a mapping of settings")
    return d
