"""An OpenAI-compatible chat endpoint that a job calls (a judge, a question writer): its key, a check before any
work starts, the client, and the JSON-schema response format that makes any model's reply parse."""

from __future__ import annotations

import os
from typing import Any


class EndpointError(RuntimeError):
    """The endpoint cannot be used: no key, refused, unreachable, or an unusable reply."""


def check_endpoint(url: str, key_env: str, role: str, key_flag: str, timeout_s: float,
                   error: type[EndpointError] = EndpointError) -> None:
    """Before any work: the key in ``$key_env`` is set and the endpoint answers (``error`` says which not). An
    endpoint that does not list models (404, 5xx on ``/models``) still passes: it was reached."""
    key = os.environ.get(key_env)
    if not key:
        raise error(
            f"the {role} endpoint's key is read from ${key_env}, which is not set: export it (an endpoint that needs "
            f"no key takes any value, e.g. {key_env}=none), or name another variable with {key_flag}")
    import openai

    client = openai.OpenAI(base_url=url, api_key=key, timeout=min(timeout_s, 15.0), max_retries=0)
    try:
        client.models.list()
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise error(f"the {role} endpoint {url} refused the key in ${key_env} (HTTP {exc.status_code})") from exc
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        raise error(f"cannot reach the {role} endpoint {url}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}") from exc
    except openai.APIStatusError:
        pass


def chat_client(url: str, key_env: str, timeout_s: float, max_retries: int = 3):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=os.environ.get(key_env) or "none", timeout=timeout_s, max_retries=max_retries)


def json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``response_format`` for a strict JSON schema (served by OpenAI, vLLM, SGLang and this service)."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
