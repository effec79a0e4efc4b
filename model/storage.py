"""Checkpoints in S3 or an S3-compatible store: fetched once into a verified cache, uploaded manifest last.

``s3://bucket/prefix`` names a checkpoint directory in a bucket: the objects directly under
``prefix/`` are its files (``config.json``, ``model.safetensors``, ...), and
``prefix/bench-manifest.json`` lists each one's size and SHA-256. ``upload_checkpoint``
removes an old manifest first and writes the new one last, so a reader never takes a
checkpoint whose upload was interrupted: no manifest, or a file that does not match it, is an
"incomplete upload" error naming the key. A sub-directory (a training run's ``step-000100/``,
``best/``) is a checkpoint of its own under its own prefix.

``fetch_checkpoint`` downloads a checkpoint once into ``<cache>/s3/<digest>/<name>``, where the
digest is the manifest's SHA-256 (so the cache is keyed on the remote content) and ``<name>``
is the prefix's last part (tables show it). Every file is checked against the manifest in a
temporary directory that is renamed into place only when all of them match, so a directory in
the cache is always complete, even when two processes fetch at once or one is killed. A second
fetch of an unchanged checkpoint reads only the manifest; a changed one lands in a new
directory. ``<cache>`` is ``$BENCH_CACHE_DIR`` or ``$XDG_CACHE_HOME/llm-backend-bench``
(``~/.cache/llm-backend-bench``), as for the export cache.

Credentials, region and endpoint come only from the standard AWS places, read by botocore
itself: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), ``AWS_PROFILE``
and ``~/.aws/credentials``/``config``, and ``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the
profile; botocore reads both since 2023) for an S3-compatible server such as MinIO or Ceph.
None of them is a command-line option, and no message here names a key or a secret.

boto3 rather than s3fs: the work is a few whole-object GETs, PUTs and listings, which boto3
does synchronously, and botocore's error codes (``NoSuchKey``, ``InvalidAccessKeyId``, ...)
map one to one onto the lines below. s3fs would add fsspec and aiobotocore (which pins
botocore to a narrow range) for a file-system interface this module does not need.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from model.errors import InputError

SCHEME = "s3://"
MANIFEST = "bench-manifest.json"
MANIFEST_FORMAT = "llm-backend-bench/s3-checkpoint"
MANIFEST_VERSION = 1
CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
           "InvalidClientTokenId", "AuthorizationHeaderMalformed", "403"}


class StorageError(InputError):
    """A remote checkpoint or file cannot be read or written; the message names the URI, never a key."""


def is_remote(uri) -> bool:
    return isinstance(uri, str) and uri.startswith(SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ("bucket", "some/prefix")."""
    if not is_remote(uri):
        raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, key = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: no bucket (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-backend-bench"
    return Path(os.environ.get("BENCH_CACHE_DIR", default)) / "s3"


# -- the client and its errors -----------------------------------------------------------

def _client():
    import boto3

    # No endpoint, region or credentials passed: botocore reads them from the environment and
    # the AWS config files. The default retries stay, so a flaky network is retried as usual.
    return boto3.session.Session().client("s3")


class _Errors:
    """Turns botocore's exceptions into one StorageError line about ``uri``."""

    def __init__(self, uri: str, client=None, missing: str | None = None):
        self.uri, self.client, self.missing = uri, client, missing

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, StorageError):
            return False
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
        from botocore.exceptions import ConnectionError as NoConnection, ReadTimeoutError
        from boto3.exceptions import S3UploadFailedError

        bucket = split_uri(self.uri)[0]
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            raise StorageError(f"{self.uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials") from None
        if isinstance(e, ConnectionError) and not isinstance(e, BotoCoreError):  # dropped mid-transfer
            raise StorageError(f"{self.uri}: the connection to the S3 endpoint was lost ({e}): "
                               f"run the command again")  from None
        if isinstance(e, (NoConnection, ReadTimeoutError)):  # refused, unresolvable, timed out
            endpoint = getattr(self.client, "meta", None) and self.client.meta.endpoint_url
            raise StorageError(f"{self.uri}: cannot reach the S3 endpoint {endpoint} "
                               f"(check AWS_ENDPOINT_URL and the network)") from None
        code = ""
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
        elif isinstance(e, S3UploadFailedError):  # boto3 wraps an upload's ClientError in its message only
            code = next((c for c in (*_DENIED, "NoSuchBucket") if f"({c})" in str(e)), "")
        if code in _DENIED:
            raise StorageError(f"access denied by s3://{bucket} ({code}): {CREDENTIALS_HINT}") from None
        if code == "NoSuchBucket":
            raise StorageError(f"{self.uri}: no such bucket {bucket!r}") from None
        if code in ("NoSuchKey", "404") and self.missing:
            raise StorageError(self.missing) from None
        if code in ("NoSuchKey", "404"):
            raise StorageError(f"{self.uri}: no such key") from None
        if isinstance(e, (ClientError, BotoCoreError, S3UploadFailedError)):
            raise StorageError(f"{self.uri}: S3 request failed ({code or type(e).__name__})") from None
        return False


# -- reading -----------------------------------------------------------------------------

def fetch_checkpoint(uri: str) -> Path:
    """The local directory of the checkpoint at ``uri``, downloaded and verified once, cached after."""
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise StorageError(f"{uri}: name a checkpoint prefix inside the bucket (s3://{bucket}/PREFIX)")
    client = _client()
    raw, manifest = _read_manifest(client, uri)
    name = prefix.rsplit("/", 1)[-1]
    digest = hashlib.sha256(raw).hexdigest()[:20]
    final = cache_root() / digest / name
    if final.is_dir():
        return final  # renamed into place only once complete
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", suffix=".tmp", dir=cache_root()))
    try:
        (tmp / name).mkdir()
        for rel, want in manifest["files"].items():
            key = f"{prefix}/{rel}"
            path = tmp / name / rel
            missing = (f"s3://{bucket}/{key}: incomplete upload: listed in {MANIFEST} but missing; "
                       f"upload {uri} again")
            with _Errors(uri, client, missing):
                client.download_file(bucket, key, str(path))
            size, sha = _file_digest(path)
            if size != want["size"] or sha != want["sha256"]:
                raise StorageError(f"s3://{bucket}/{key}: incomplete upload: {size} bytes with sha256 {sha[:16]}, "
                                   f"but {MANIFEST} lists {want['size']} bytes with sha256 {want['sha256'][:16]}; "
                                   f"upload {uri} again")
        final.parent.mkdir(exist_ok=True)
        try:
            (tmp / name).rename(final)
        except OSError:  # another process finished the same checkpoint first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_manifest(client, uri: str) -> tuple[bytes, dict]:
    bucket, prefix = split_uri(uri)
    key = f"{prefix}/{MANIFEST}"
    with _Errors(uri, client):
        try:
            raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1).get("KeyCount", 0)
            if not listed:
                raise StorageError(f"{uri}: no such checkpoint (no objects under this prefix)") from None
            raise StorageError(f"s3://{bucket}/{key}: incomplete upload: objects exist under {uri} but its "
                               f"{MANIFEST} is missing (interrupted, or not uploaded by bench); "
                               f"upload it again") from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        ok = manifest.get("format") == MANIFEST_FORMAT and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise StorageError(f"s3://{bucket}/{key}: not a manifest of ours (no \"format\": {MANIFEST_FORMAT!r} "
                           f"with files of size and sha256)")
    for rel in files:
        if "/" in rel or rel.startswith(".") or rel in ("", MANIFEST):
            raise StorageError(f"s3://{bucket}/{key}: file name {rel!r} is not a plain file of the checkpoint")
    return raw, manifest


# -- writing -----------------------------------------------------------------------------

def upload_checkpoint(local_dir: str | Path, uri: str) -> bool:
    """Upload the files of ``local_dir`` (not its sub-directories) to ``uri``, the manifest last.

    Returns False when ``uri`` already holds exactly these files (same manifest) and nothing
    was sent. An old manifest is deleted before any file is replaced, so a reader during the
    upload, or after an interrupted one, sees an incomplete upload rather than mixed files.
    """
    local_dir = Path(local_dir)
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise StorageError(f"{uri}: name a prefix inside the bucket (s3://{bucket}/PREFIX)")
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: not a directory to upload")
    files = sorted(p for p in local_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST)
    entries = {}
    for p in files:
        size, sha = _file_digest(p)
        entries[p.name] = dict(size=size, sha256=sha)
    manifest = dict(format=MANIFEST_FORMAT, format_version=MANIFEST_VERSION, files=entries)
    body = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    client = _client()
    key = f"{prefix}/{MANIFEST}"
    with _Errors(uri, client):
        try:
            if client.get_object(Bucket=bucket, Key=key)["Body"].read() == body:
                return False
        except client.exceptions.NoSuchKey:
            pass
        client.delete_object(Bucket=bucket, Key=key)
        for p in files:
            client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
    return True


def check_access(uri: str) -> bool:
    """Fail now, before hours of training, when the bucket cannot be listed with these credentials;
    whether anything is stored under ``uri`` already."""
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise StorageError(f"{uri}: name a prefix inside the bucket (s3://{bucket}/PREFIX)")
    client = _client()
    with _Errors(uri, client):
        return client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1).get("KeyCount", 0) > 0


def upload_file(data: bytes, uri: str, content_type: str = "application/octet-stream") -> None:
    """One object, whole: S3 makes a PUT visible only once it has every byte."""
    bucket, key = split_uri(uri)
    if not key or uri.endswith("/"):
        raise StorageError(f"{uri}: name an object key (s3://{bucket}/path/file.json)")
    client = _client()
    with _Errors(uri, client):
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


def delete_checkpoint(uri: str) -> None:
    """Remove the checkpoint at ``uri``: its manifest first, so it is never seen half deleted."""
    bucket, prefix = split_uri(uri)
    client = _client()
    with _Errors(uri, client):
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", []) if "/" not in o["Key"][len(prefix) + 1:]]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def list_checkpoints(uri: str) -> list[str]:
    """The names of the sub-checkpoints directly under ``uri`` (``step-000100``, ``best``)."""
    bucket, prefix = split_uri(uri)
    client = _client()
    names = []
    with _Errors(uri, client):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/",
                                                                     Delimiter="/"):
            names += [p["Prefix"][len(prefix) + 1:].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def localize(value):
    """``value`` with every ``s3://`` entry fetched into its local cached directory: a string
    (one path, or a comma-separated list as ``bench run --checkpoint`` takes) or a list."""
    if isinstance(value, list):
        return [fetch_checkpoint(v).as_posix() if is_remote(v) else v for v in value]
    if not isinstance(value, str) or SCHEME not in value:
        return value
    return ",".join(fetch_checkpoint(v.strip()).as_posix() if is_remote(v.strip()) else v
                    for v in value.split(","))


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
