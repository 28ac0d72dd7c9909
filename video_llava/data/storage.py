"""Where videos and results live: ``s3://bucket/prefix`` or a local directory, behind one small interface.

Listing uses boto3 (it returns each object's ETag, which the resumable caption job keys on); Ray Data's
writers get a ``pyarrow.fs`` filesystem for the same location.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from video_llava.video.image import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".gif", ".mpg", ".mpeg", ".ts", ".3gp", ".flv", ".wmv", ".ogv"}
)


class StorageError(RuntimeError):
    """A location cannot be used (no such bucket, access denied, not a directory); the message says which."""


@dataclass(frozen=True)
class Location:
    """A parsed ``s3://bucket/prefix`` or local directory."""

    scheme: str  # "s3" or "file"
    bucket: str
    prefix: str  # s3: key prefix ("" or ending in "/"); file: absolute directory path

    @classmethod
    def parse(cls, uri: str) -> "Location":
        if uri.startswith("s3://"):
            parts = urlsplit(uri)
            if not parts.netloc:
                raise StorageError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix/")
            prefix = parts.path.lstrip("/")
            if prefix and not prefix.endswith("/"):
                prefix += "/"
            return cls("s3", parts.netloc, prefix)
        if "://" in uri and not uri.startswith("file://"):
            raise StorageError(f"unsupported location {uri!r}: use s3://bucket/prefix/ or a local directory")
        path = Path(uri.removeprefix("file://")).expanduser().resolve()
        return cls("file", "", str(path))

    def join(self, name: str) -> str:
        """A path under this location, as the pyarrow filesystem names it."""
        if self.scheme == "s3":
            return f"{self.bucket}/{self.prefix}{name}"
        return os.path.join(self.prefix, name)


@dataclass(frozen=True)
class StoredObject:
    key: str  # s3 key, or the path relative to the local directory
    size: int
    etag: str


def s3_client(endpoint_url: str | None = None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def _explain(exc: Exception, location: Location) -> StorageError:
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    where = f"s3://{location.bucket}/{location.prefix}"
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot reach the S3 endpoint for {where}: {exc}")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StorageError(f"no such bucket: {location.bucket}")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return StorageError(f"access denied to {where} ({code}): check the credentials and the bucket policy")
        return StorageError(f"S3 error for {where}: {code or exc}")
    return StorageError(f"cannot list {where}: {exc}")


def list_objects(location: Location, endpoint_url: str | None = None) -> Iterator[StoredObject]:
    """Every object under the location, recursively (videos and not)."""
    if location.scheme == "file":
        root = Path(location.prefix)
        if not root.is_dir():
            raise StorageError(f"not a directory: {root}")
        for dirpath, _, files in os.walk(root):
            for name in sorted(files):
                path = Path(dirpath) / name
                stat = path.stat()
                # A local "etag": changes when the file is rewritten, like S3's.
                etag = hashlib.blake2b(f"{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8).hexdigest()
                yield StoredObject(path.relative_to(root).as_posix(), stat.st_size, etag)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(endpoint_url)
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.prefix):
            for entry in page.get("Contents", []):
                yield StoredObject(entry["Key"], int(entry["Size"]), entry["ETag"].strip('"'))
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc, location) from exc


def is_video_key(key: str) -> bool:
    return Path(key).suffix.lower() in VIDEO_EXTENSIONS


def is_image_key(key: str) -> bool:
    return Path(key).suffix.lower() in IMAGE_EXTENSIONS


def read_object(location: Location, key: str, client=None, max_bytes: int | None = None) -> bytes:
    """The bytes of one object (``client``: a boto3 S3 client to reuse), at most ``max_bytes`` of them.

    A local key that resolves outside the input directory (a symlink to /etc/passwd) is refused, not read.
    An S3 body is read under the limit whatever its listing said."""
    if location.scheme == "file":
        root = Path(location.prefix).resolve()
        path = (root / key).resolve()
        if not path.is_relative_to(root):
            raise StorageError(f"{key} is a link out of the input directory (to {path}); links out of it are not followed")
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise StorageError(f"{key} is {path.stat().st_size} bytes, over the limit of {max_bytes} bytes")
        return path.read_bytes()
    body = client.get_object(Bucket=location.bucket, Key=key)["Body"]
    chunks, size = [], 0
    try:
        for chunk in body.iter_chunks(1 << 20):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise StorageError(f"{key} is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    finally:
        body.close()
    return b"".join(chunks)


def pyarrow_filesystem(location: Location, endpoint_url: str | None = None):
    """A ``pyarrow.fs`` filesystem for Ray Data readers/writers, with the same endpoint and credentials."""
    import pyarrow.fs as pafs

    if location.scheme == "file":
        return pafs.LocalFileSystem()
    kwargs: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1"))}
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        kwargs.update(endpoint_override=parts.netloc or endpoint_url, scheme=parts.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)
