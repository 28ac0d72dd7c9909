"""Fetch a video or image named by URL: http(s) with an SSRF guard, ``s3://`` via boto3, inline ``data:`` URLs.

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


class ByteBudget:
    """Bytes one request may still bring in, across all its media; counted as they arrive."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise ServiceError(
                413, f"the media of this request exceed the limit of {self.limit} bytes together",
                code="request_too_large", param="messages",
            )


class _Reader:
    """Counts a body's bytes against the per-video limit and the request's ``ByteBudget`` while reading it."""

    def __init__(self, limits: LimitSettings, budget: ByteBudget | None):
        self.limit, self.budget = limits.max_upload_bytes, budget
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise _too_large(self.limit)
        if self.budget is not None:
            self.budget.take(len(chunk))
        self.chunks.append(chunk)

    def data(self) -> bytes:
        return b"".join(self.chunks)


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


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _wrapped_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: mapped, 6to4, Teredo (server and client), NAT64."""
    if address.ipv4_mapped:
        return [address.ipv4_mapped]
    if address.sixtofour:
        return [address.sixtofour]
    if address.teredo:
        return list(address.teredo)
    if address in NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def _is_public(address: ipaddress._BaseAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:  # fec0::/10: deprecated, still routed inside sites; ipaddress calls it global
            return False
        wrapped = _wrapped_ipv4(address)
        if wrapped:  # 2002:7f00:1:: is 127.0.0.1 over 6to4: judged by what it wraps
            return all(_is_public(a) for a in wrapped)
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


async def _fetch_http(url: str, limits: LimitSettings, budget: ByteBudget | None) -> bytes:
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
                reader = _Reader(limits, budget)
                async for chunk in response.aiter_bytes():
                    reader.add(chunk)
                return reader.data()
            finally:
                await response.aclose()
    raise _bad_url(f"more than {MAX_REDIRECTS} redirects", code="fetch_failed")


def _decode_data_url(url: str, limits: LimitSettings, budget: ByteBudget | None) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise _bad_url("malformed data: URL (no comma)")
    if len(payload) * 3 // 4 > limits.max_upload_bytes:
        raise _too_large(limits.max_upload_bytes)
    try:
        data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise _bad_url("malformed data: URL (invalid base64)")
    _Reader(limits, budget).add(data)
    return data


S3_KEY_MAX = 1024
_NOT_FOUND_OR_DENIED = "no such S3 object, or not one this service may read: {uri}"


def _s3_target(url: str, limits: LimitSettings) -> tuple[str, str]:
    """(bucket, key) of an ``s3://`` URL a client may name; one message for absent and not allowed alike."""
    parts = urlsplit(url)
    bucket, key = parts.netloc, unquote_to_bytes(parts.path.lstrip("/")).decode("utf-8", "replace")
    if not bucket or not key:
        raise _bad_url(f"bad S3 URI {url[:200]!r}: expected s3://bucket/key")
    segments = key.split("/")
    if (len(key.encode()) > S3_KEY_MAX or "\ufffd" in key or any(ord(c) < 32 or c == "\x7f" for c in key)
            or any(s in (".", "..") for s in segments) or parts.query or parts.fragment):
        raise _bad_url(f"bad S3 key in {url[:200]!r}: no '.' or '..' segments, control characters, query or fragment")
    if bucket not in limits.s3_buckets:  # the same answer as a missing object: bucket names are not probed here
        raise _bad_url(_NOT_FOUND_OR_DENIED.format(uri=f"s3://{bucket}/{key}"), code="video_not_found")
    return bucket, key


def _fetch_s3(url: str, limits: LimitSettings, budget: ByteBudget | None) -> bytes:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, key = _s3_target(url, limits)
    client = boto3.client(
        "s3",
        endpoint_url=limits.s3_endpoint_url,
        config=Config(connect_timeout=limits.fetch_timeout_s, read_timeout=limits.fetch_timeout_s, retries={"max_attempts": 2}),
    )
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
        if obj.get("ContentLength", 0) > limits.max_upload_bytes:
            raise _too_large(limits.max_upload_bytes)
        # Read under the limit whatever the header said (a server that says 10 B and sends 400 MiB is cut off).
        reader = _Reader(limits, budget)
        body = obj["Body"]
        try:
            for chunk in body.iter_chunks(1 << 20):
                reader.add(chunk)
        finally:
            body.close()
        return reader.data()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound", "403", "AccessDenied"):
            # one answer for both: a client cannot learn which buckets and keys exist
            raise _bad_url(_NOT_FOUND_OR_DENIED.format(uri=f"s3://{bucket}/{key}"), code="video_not_found")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise _bad_url("the service's S3 credentials were refused", code="s3_access_denied")
        raise _bad_url(f"S3 error for s3://{bucket}/{key}: {code or exc}", code="fetch_failed")
    except NoCredentialsError:
        raise _bad_url("the service has no S3 credentials configured", code="s3_access_denied")
    except BotoCoreError as exc:
        raise _bad_url(f"S3 request failed: {exc}", code="fetch_failed")


async def fetch_media(url: str, limits: LimitSettings, budget: ByteBudget | None = None, kind: str = "video") -> Fetched:
    """``fetch_video`` for a video or an image: the same guard and limits; an image's errors name the image
    (``image_not_found``, ``invalid_image_url``, param ``image_url``)."""
    try:
        return await fetch_video(url, limits, budget)
    except ServiceError as exc:
        if kind == "video":
            raise
        rename = lambda text: text.replace("video", kind) if text else text  # noqa: E731
        raise ServiceError(exc.status, rename(exc.message), exc.type, rename(exc.code), f"{kind}_url", exc.headers) from None


async def fetch_video(url: str, limits: LimitSettings, budget: ByteBudget | None = None) -> Fetched:
    """Bytes of the video at ``url`` within the time and size limits (``budget``: the request's bytes left for all
    its media), or a ``ServiceError`` (4xx)."""
    start = time.perf_counter()
    try:
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise _bad_url(f"malformed URL {url[:200]!r}: {exc}")
    try:
        if scheme == "data":
            data, source = _decode_data_url(url, limits, budget), "data"
        elif scheme == "s3":
            data = await asyncio.wait_for(asyncio.to_thread(_fetch_s3, url, limits, budget), limits.fetch_timeout_s)
            source = "s3"
        elif scheme in ("http", "https"):
            data = await asyncio.wait_for(_fetch_http(url, limits, budget), limits.fetch_timeout_s)
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
