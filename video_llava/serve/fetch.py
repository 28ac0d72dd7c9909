"""Fetch a video named by URL: http(s) with an SSRF guard, ``s3://`` via boto3, inline ``data:`` URLs.

The guard resolves the host itself, refuses loopback/private/link-local/reserved addresses unless the host is
allow-listed, and then connects to the address it checked (Host header and TLS SNI keep the name), so a DNS
answer cannot change between check and use. Redirects are followed by hand, each hop checked again.
``file://`` and other schemes are never fetched: the server does not read local paths on a client's say-so.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urljoin, urlsplit, urlunsplit

import httpx

from video_llava.serve.config import LimitSettings
from video_llava.serve.protocol import ServiceError

MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Fetched:
    data: bytes
    source: str  # "http", "s3" or "data"
    seconds: float


def _too_large(limit: int) -> ServiceError:
    return ServiceError(413, f"video is larger than the limit of {limit} bytes", code="video_too_large", param="video_url")


def _bad_url(message: str, code: str = "invalid_video_url") -> ServiceError:
    return ServiceError(400, message, code=code, param="video_url")


def _host_allowed(host: str, address: ipaddress._BaseAddress, limits: LimitSettings) -> bool:
    for entry in limits.url_allowlist:
        if entry.lower() == host.lower():
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def _is_public(address: ipaddress._BaseAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved)


async def _checked_address(host: str, port: int, limits: LimitSettings) -> str:
    """Resolve ``host`` and return one address that policy allows, or raise a 400."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise _bad_url(f"cannot resolve host {host!r}", code="fetch_failed")
    except UnicodeError:  # IDNA: an empty label (a..b) or one over 63 characters
        raise _bad_url(f"malformed host name {host[:100]!r}")
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if limits.allow_private_urls or _is_public(address) or _host_allowed(host, address, limits):
            continue
        raise _bad_url(
            f"refusing to fetch {host} ({address}): loopback, private and link-local addresses are not allowed "
            "(add the host to limits.url_allowlist for a trusted private deployment)",
            code="url_not_allowed",
        )
    return str(addresses[0])


def _http_target(url: str) -> tuple:
    """(parts, host, port) of an http(s) URL; a 400 for any other scheme or a URL that does not parse."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as exc:
        raise _bad_url(f"malformed URL {url[:200]!r}: {exc}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad_url(f"unsupported URL {url[:200]!r}: use http(s)://, s3:// or data:", code="url_not_allowed")
    return parts, parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def _fetch_http(url: str, limits: LimitSettings) -> bytes:
    async with httpx.AsyncClient(follow_redirects=False, timeout=limits.fetch_timeout_s) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parts, host, port = _http_target(url)
            address = await _checked_address(host, port, limits)
            pinned_host = f"[{address}]" if ":" in address else address
            pinned = urlunsplit((parts.scheme, f"{pinned_host}:{port}", parts.path or "/", parts.query, ""))
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "video-llava/0.1"}
            extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
            try:
                request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
                response = await client.send(request, stream=True)
            except httpx.InvalidURL as exc:  # httpx also parses a redirect's Location while sending: not an HTTPError
                raise _bad_url(f"the server at {host} answered with an invalid URL: {exc}", code="fetch_failed")
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise _bad_url("redirect without a Location header", code="fetch_failed")
                    url = urljoin(url, location)
                    continue
                if response.status_code >= 400:
                    raise _bad_url(f"fetching the video failed: HTTP {response.status_code} from {parts.hostname}", code="fetch_failed")
                declared = int(response.headers.get("content-length") or 0)
                if declared > limits.max_upload_bytes:
                    raise _too_large(limits.max_upload_bytes)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_upload_bytes:
                        raise _too_large(limits.max_upload_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                await response.aclose()
    raise _bad_url(f"more than {MAX_REDIRECTS} redirects", code="fetch_failed")


def _decode_data_url(url: str, limits: LimitSettings) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise _bad_url("malformed data: URL (no comma)")
    if len(payload) * 3 // 4 > limits.max_upload_bytes:
        raise _too_large(limits.max_upload_bytes)
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise _bad_url("malformed data: URL (invalid base64)")


def _fetch_s3(url: str, limits: LimitSettings) -> bytes:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    parts = urlsplit(url)
    bucket, key = parts.netloc, unquote_to_bytes(parts.path.lstrip("/")).decode("utf-8", "replace")
    if not bucket or not key:
        raise _bad_url(f"bad S3 URI {url[:200]!r}: expected s3://bucket/key")
    client = boto3.client(
        "s3",
        endpoint_url=limits.s3_endpoint_url,
        config=Config(connect_timeout=limits.fetch_timeout_s, read_timeout=limits.fetch_timeout_s, retries={"max_attempts": 2}),
    )
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] > limits.max_upload_bytes:
            raise _too_large(limits.max_upload_bytes)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise _bad_url(f"no such S3 object: s3://{bucket}/{key}", code="video_not_found")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise _bad_url(f"access denied to s3://{bucket}/{key}", code="s3_access_denied")
        raise _bad_url(f"S3 error for s3://{bucket}/{key}: {code or exc}", code="fetch_failed")
    except NoCredentialsError:
        raise _bad_url("the service has no S3 credentials configured", code="s3_access_denied")
    except BotoCoreError as exc:
        raise _bad_url(f"S3 request failed: {exc}", code="fetch_failed")


async def fetch_video(url: str, limits: LimitSettings) -> Fetched:
    """Bytes of the video at ``url`` within the time and size limits, or a ``ServiceError`` (4xx)."""
    start = time.perf_counter()
    try:
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise _bad_url(f"malformed URL {url[:200]!r}: {exc}")
    try:
        if scheme == "data":
            data, source = _decode_data_url(url, limits), "data"
        elif scheme == "s3":
            data = await asyncio.wait_for(asyncio.to_thread(_fetch_s3, url, limits), limits.fetch_timeout_s)
            source = "s3"
        elif scheme in ("http", "https"):
            data = await asyncio.wait_for(_fetch_http(url, limits), limits.fetch_timeout_s)
            source = "http"
        else:
            raise _bad_url(
                f"unsupported URL scheme {scheme or '(none)'!r}: use http(s)://, s3:// or data:video/...;base64,",
                code="url_not_allowed",
            )
    except asyncio.TimeoutError:
        raise _bad_url(f"fetching the video took longer than {limits.fetch_timeout_s:g} s", code="fetch_timeout")
    except httpx.HTTPError as exc:
        raise _bad_url(f"fetching the video failed: {type(exc).__name__}: {exc}", code="fetch_failed")
    if not data:
        raise ServiceError(422, "the video is empty (0 bytes)", code="invalid_video", param="video_url")
    return Fetched(data, source, time.perf_counter() - start)
