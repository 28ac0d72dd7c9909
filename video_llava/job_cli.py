"""Command-line flags for a job's typed config: one ``--flag`` per pydantic field, validated once."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from video_llava.ray_runtime import ClusterResourceError

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
    """The config from ``base`` (e.g. a YAML file) overridden by the flags given; raises ``ValueError`` if invalid,
    its message naming each bad flag (``--input: required``), not pydantic's dump."""
    given = {k: v for k, v in flags.items() if v not in (None, False)}
    try:
        return config_cls.model_validate({**(base or {}), **given})
    except ValidationError as exc:
        raise ValueError(flag_errors(exc)) from None


def flag_errors(exc: ValidationError) -> str:
    """A pydantic error as one line of ``--flag: reason`` items."""
    items = []
    for error in exc.errors():
        where = "--" + str(error["loc"][0]).replace("_", "-") if error.get("loc") else ""
        reason = "required" if error.get("type") == "missing" else str(error.get("msg", "invalid"))
        reason = reason.removeprefix("Value error, ")
        items.append(f"{where}: {reason}" if where else reason)
    return "; ".join(items)


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
        check_submitted_job(cfg)
        main(cfg)
    except (SubmittedJobError, ClusterResourceError, *expected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


class SubmittedJobError(ValueError):
    """A ``ray job submit`` job was given something only the submitting machine has (a relative path, credentials)."""


def submitted_working_dir() -> bool:
    """Whether this process is the driver of a ``ray job submit --working-dir`` job: it runs in a temporary copy of
    that directory (Ray hands the driver its runtime env in ``RAY_JOB_CONFIG_JSON_ENV_VAR``)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return False
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def check_submitted_job(cfg: BaseModel) -> None:
    """In a submitted job, refuse relative paths and ``s3://`` without credentials, saying what to do instead.

    ``--working-dir`` uploads the tracked files only (git-ignored ``data/`` and ``runs/`` stay behind) into a temporary
    directory that is deleted with the job, and the shell's ``AWS_*`` variables do not follow the job.
    """
    if not submitted_working_dir():
        return
    relative = []
    for name, value in cfg:
        local = isinstance(value, Path) or (name in ("input", "output") and isinstance(value, str)
                                            and "://" not in value and value != "-")
        if local and value is not None and not Path(value).is_absolute():
            relative.append(f"--{name.replace('_', '-')} {value}")
    if relative:
        raise SubmittedJobError(
            f"relative paths in a submitted job ({', '.join(relative)}): a job of `ray job submit --working-dir` runs "
            "in a temporary copy of that directory, where git-ignored files such as data/ and runs/ are not uploaded "
            "and what the job writes is deleted with it. Give paths every node sees (shared storage such as /shared/... "
            "on EFS or NFS) or s3:// URIs"
        )
    if any(isinstance(value, str) and value.startswith("s3://") for _, value in cfg):
        import boto3
        from botocore.exceptions import BotoCoreError

        try:
            credentials = boto3.Session().get_credentials()
        except BotoCoreError as exc:
            raise SubmittedJobError(f"this job reads or writes s3:// but cannot read AWS credentials: {exc}") from None
        if credentials is None:
            raise SubmittedJobError(
                "this job reads or writes s3:// but finds no AWS credentials: `ray job submit` does not pass your "
                "shell's AWS_* variables to the job. Add --runtime-env-json '{\"env_vars\": {\"AWS_ACCESS_KEY_ID\": "
                "\"...\", \"AWS_SECRET_ACCESS_KEY\": \"...\"}}', or give the cluster's nodes an instance role"
            )


def absolute_paths(cfg: ConfigT) -> ConfigT:
    """``cfg`` with its path fields, and a ``model`` that names a local directory, made absolute (on the driver):
    Ray workers and actors run in directories of their own, where relative paths point elsewhere."""
    update = {name: value.resolve() for name, value in cfg if isinstance(value, Path)}
    model = getattr(cfg, "model", None)
    if isinstance(model, str) and Path(model).expanduser().is_dir():
        update["model"] = str(Path(model).expanduser().resolve())
    return cfg.model_copy(update=update)
