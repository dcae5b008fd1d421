"""Flags generated from the typed config dataclasses: the one place where flags become config.

A field declared with `opt(default, help, choices=..., flag=...)` becomes `--field-name` (or its
own flag) with that help, its choices and its default shown; booleans get `--x/--no-x`. Every
generated flag defaults to None, meaning "not given", so a config file's value survives unless
the flag is passed (file first, CLI overrides). Imports no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable, Mapping


def _number_list(text: str) -> float | list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected a number or a comma-separated list")
    return vals[0] if len(vals) == 1 else vals


def int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# annotation text (the configs use `from __future__ import annotations`) -> argparse type
_TYPES = {"float": float, "int": int, "str": str, "Optional[float]": float, "Optional[int]": int,
          "Optional[str]": str, "float | None": float, "int | None": int, "str | None": str,
          "Optional[Union[float, list[float]]]": _number_list, "tuple[int, ...]": int_list,
          "Optional[tuple[int, ...]]": int_list,
          "list[int]": int_list, "list[str]": str_list}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields(cls: type, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` the CLI exposes (declared with opt(..., cli=True)), in declaration order."""
    want = list(only) if only is not None else None
    skip = set(skip)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", False):
            continue
        if want is not None and f.name not in want:
            continue
        out.append(f)
    if want is not None:
        missing = set(want) - {f.name for f in out}
        assert not missing, f"{cls.__name__} has no CLI fields {sorted(missing)}"
        out.sort(key=lambda f: want.index(f.name))
    return out


def _default_text(f: dataclasses.Field, shown: Mapping[str, Any]) -> str:
    if f.name in shown:
        v = shown[f.name]
    elif f.default is not dataclasses.MISSING:
        v = f.default
    else:
        return ""
    if v is None:
        return ""
    if isinstance(v, bool):
        return f" (default: {'on' if v else 'off'})"
    if isinstance(v, (list, tuple)):
        v = ",".join(str(x) for x in v)
    return f" (default: {v})"


def add_config_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                    only: Iterable[str] | None = None, skip: Iterable[str] = (), dest_prefix: str = "",
                    shown_defaults: Mapping[str, Any] | None = None) -> None:
    """Add one flag per CLI field of the config dataclass `cls` (dest = dest_prefix + field name)."""
    shown = dict(shown_defaults or {})
    for f in cli_fields(cls, only, skip):
        meta = f.metadata
        help_ = (meta.get("help") or "") + _default_text(f, shown)
        kw: dict[str, Any] = {"dest": dest_prefix + f.name, "default": None, "help": help_}
        if f.type in ("bool", "Optional[bool]"):
            p.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **kw)
            continue
        kw["type"] = _TYPES.get(str(f.type), str)
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("const") is not None:
            kw.update(nargs="?", const=meta["const"])
        kw["metavar"] = meta.get("metavar") or (f.name.upper() if dest_prefix else None)
        if kw["metavar"] is None or "choices" in kw:
            del kw["metavar"]
        p.add_argument(flag_of(f), **kw)


def config_overrides(args: argparse.Namespace, cls: type, *, only: Iterable[str] | None = None,
                     skip: Iterable[str] = (), dest_prefix: str = "") -> dict[str, Any]:
    """{field: value} of the generated flags that were given (None = not given)."""
    out = {}
    for f in cli_fields(cls, only, skip):
        v = getattr(args, dest_prefix + f.name, None)
        if v is not None:
            out[f.name] = tuple(v) if str(f.type).startswith("tuple") and isinstance(v, list) else v
    return out
