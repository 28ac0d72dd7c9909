"""Command-line flags for a job's typed config: one ``--flag`` per pydantic field, validated once."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type[BaseModel], required: bool = True) -> None:
    """``--field-name`` for every field; booleans are switches. ``required=False`` when a file may supply them."""
    for name, field in config_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, action="store_true", help=field.description)
        else:
            parser.add_argument(flag, default=None, required=required and field.is_required(), help=field.description)


def config_from_flags(config_cls: type[ConfigT], flags: dict[str, Any], base: dict[str, Any] | None = None) -> ConfigT:
    """The config from ``base`` (e.g. a YAML file) overridden by the flags given; raises ``ValueError`` if invalid."""
    given = {k: v for k, v in flags.items() if v not in (None, False)}
    return config_cls.model_validate({**(base or {}), **given})


def run_job(config_cls: type[ConfigT], main: Callable[[ConfigT], Any], prog: str, doc: str | None,
            argv: list[str] | None = None, expected: tuple[type[Exception], ...] = ()) -> int:
    """A job's command line: flags -> validated config -> ``main(config)``. Invalid flags, and the ``expected``
    errors (a missing input, say), print one ``error:`` line and return 2 instead of a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0])
    add_config_flags(parser, config_cls)
    try:
        cfg = config_from_flags(config_cls, vars(parser.parse_args(argv)))
    except ValueError as exc:
        print(f"error: invalid arguments: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        main(cfg)
    except expected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def absolute_paths(cfg: ConfigT) -> ConfigT:
    """``cfg`` with its path fields, and a ``model`` that names a local directory, made absolute (on the driver):
    Ray workers and actors run in directories of their own, where relative paths point elsewhere."""
    update = {name: value.resolve() for name, value in cfg if isinstance(value, Path)}
    model = getattr(cfg, "model", None)
    if isinstance(model, str) and Path(model).expanduser().is_dir():
        update["model"] = str(Path(model).expanduser().resolve())
    return cfg.model_copy(update=update)
