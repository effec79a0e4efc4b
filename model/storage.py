"""Checkpoints in S3 or an S3-compatible store: fetched once into a verified cache, uploaded manifest last.

``s3://bucket/prefix`` names a checkpoint directory in a bucket: the objects directly under
``prefix/`` are its files (``config.json``, ``model.safetensors``, ...). Objects deeper down are
not part of it: a sub-directory (a training run's ``step-000100/``, ``best/``) is a checkpoint of
its own under its own prefix, and one that is not (a Hugging Face repository's ``original/``) is
neither listed nor downloaded. A checkpoint is one of two kinds:

- **Uploaded by bench** (``upload_checkpoint``): ``prefix/bench-manifest.json`` lists each file's
  size and SHA-256, and every file is checked against it. The upload first writes the marker
  ``prefix/bench-upload-in-progress``, then removes the old manifest, sends the files, writes the
  new manifest and deletes the marker last. So a prefix holding the marker and no manifest is a
  bench upload still running or interrupted, refused as an "incomplete upload". With a manifest
  the marker is ignored: that manifest is the old one, whose files are not replaced yet, or the
  new one, written after all its files; either way a file that does not match it is refused as
  an incomplete upload. ``delete_checkpoint`` writes the marker first too. Manifests written
  before the marker existed read as before.
- **A plain directory** uploaded by any other tool (``aws s3 cp --recursive``/``sync``, boto3, the
  console, rclone): no manifest and no marker. Its listing is the truth: it must hold
  ``config.json``; every object directly under the prefix is downloaded and checked against the
  size and ETag the listing gave. The reads are conditional on that ETag (``If-Match``), so an
  object replaced after the listing fails the fetch instead of mixing two uploads. A single-part
  ETag (32 hex digits, no ``-``) is the object's MD5 and must match the downloaded bytes, except
  under SSE-KMS or SSE-C, where it is not an MD5 (a store whose plain ETags are not MD5s fails
  here: upload to it with bench, which checks SHA-256). A multipart ETag (``<md5 of the parts' MD5s>-<n>``)
  is recomputed for the part sizes it can have been made with: part 1's size as ``HeadObject
  PartNumber=1`` reports it, the 8 MiB default of the AWS CLI and boto3, and the size divided
  among ``n`` parts rounded up to a MiB. When none of them reproduces it (parts of unequal
  sizes) or the object is KMS- or customer-key-encrypted, the object is checked by size only and
  a ``note:`` line on stderr says so; that is not a failure. A checkpoint interrupted by a bench
  from before the marker (no manifest, no marker) cannot be told from a plain directory: its
  objects are each intact, but may be from two uploads.

``fetch_checkpoint`` downloads a checkpoint once into ``<cache>/s3/<digest>/<name>``, where the
digest is the manifest's SHA-256, or for a plain directory the SHA-256 of its listing (each
object's name, size and ETag), so the cache is keyed on the remote content; ``<name>`` is the
prefix's last part (tables show it). Every file is checked in a temporary directory that is
renamed into place only when all of them match, so a directory in the cache is always complete,
even when two processes fetch at once or one is killed. A second fetch of an unchanged checkpoint
reads only the manifest (a plain directory: looks the manifest up, finds none, and lists the
prefix); a changed one lands in a new directory. ``<cache>`` is ``$BENCH_CACHE_DIR`` or
``$XDG_CACHE_HOME/llm-backend-bench`` (``~/.cache/llm-backend-bench``), as for the export cache.

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
import re
import shutil
import sys
import tempfile
from pathlib import Path

from model.errors import InputError

SCHEME = "s3://"
MANIFEST = "bench-manifest.json"
MANIFEST_FORMAT = "llm-backend-bench/s3-checkpoint"
MANIFEST_VERSION = 1
UPLOADING = "bench-upload-in-progress"  # written before a bench upload or delete, removed after it
CONFIG = "config.json"
MiB = 1 << 20
DEFAULT_PART_SIZE = 8 * MiB  # the AWS CLI's and boto3's multipart_chunksize
_SINGLE_PART_ETAG = re.compile(r"[0-9a-f]{32}")
_MULTIPART_ETAG = re.compile(r"[0-9a-f]{32}-([0-9]+)")
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

    def __init__(self, uri: str, client=None, missing: str | None = None, changed: str | None = None):
        self.uri, self.client, self.missing, self.changed = uri, client, missing, changed

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
        if code in ("PreconditionFailed", "412") and self.changed:  # If-Match: not the ETag listed
            raise StorageError(self.changed) from None
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
    raw = _get_manifest(client, uri)
    if raw is not None:
        files = _parse_manifest(raw, uri)["files"]
        digest = hashlib.sha256(raw).hexdigest()[:20]
        fetch = _manifest_file
    else:
        files = _list_directory(client, uri)
        listing = json.dumps(sorted((rel, f["size"], f["etag"]) for rel, f in files.items()))
        digest = hashlib.sha256(f"plain directory\n{listing}".encode()).hexdigest()[:20]
        fetch = _plain_file
    name = prefix.rsplit("/", 1)[-1]
    final = cache_root() / digest / name
    if final.is_dir():
        return final  # renamed into place only once complete
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", suffix=".tmp", dir=cache_root()))
    notes = []
    try:
        (tmp / name).mkdir()
        for rel, want in files.items():
            note = fetch(client, uri, f"{prefix}/{rel}", tmp / name / rel, want)
            if note:
                notes.append(note)
        final.parent.mkdir(exist_ok=True)
        try:
            (tmp / name).rename(final)
        except OSError:  # another process finished the same checkpoint first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return final


# -- a checkpoint uploaded by bench: its manifest ----------------------------------------

def _get_manifest(client, uri: str) -> bytes | None:
    """The manifest's bytes, or None when the prefix has none."""
    bucket, prefix = split_uri(uri)
    with _Errors(uri, client):
        try:
            return client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
        except client.exceptions.NoSuchKey:
            return None


def _parse_manifest(raw: bytes, uri: str) -> dict:
    bucket, prefix = split_uri(uri)
    key = f"{prefix}/{MANIFEST}"
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
        if "/" in rel or rel.startswith(".") or rel in ("", MANIFEST, UPLOADING):
            raise StorageError(f"s3://{bucket}/{key}: file name {rel!r} is not a plain file of the checkpoint")
    return manifest


def _manifest_file(client, uri: str, key: str, path: Path, want: dict) -> None:
    """Download one file the manifest lists and check its size and SHA-256."""
    bucket = split_uri(uri)[0]
    missing = f"s3://{bucket}/{key}: incomplete upload: listed in {MANIFEST} but missing; upload {uri} again"
    with _Errors(uri, client, missing):
        client.download_file(bucket, key, str(path))
    size, sha = _file_digest(path)
    if size != want["size"] or sha != want["sha256"]:
        raise StorageError(f"s3://{bucket}/{key}: incomplete upload: {size} bytes with sha256 {sha[:16]}, "
                           f"but {MANIFEST} lists {want['size']} bytes with sha256 {want['sha256'][:16]}; "
                           f"upload {uri} again")


# -- a plain directory: its listing ------------------------------------------------------

def _list_directory(client, uri: str) -> dict[str, dict]:
    """{file name: {size, etag}} of the objects directly under the prefix of a checkpoint without
    a manifest; refused when it is a bench upload in progress or interrupted, or has no config.json."""
    bucket, prefix = split_uri(uri)
    files, subdirs = {}, []
    with _Errors(uri, client):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/",
                                                                 Delimiter="/")
        for page in pages:
            subdirs += [p["Prefix"][len(prefix) + 1:] for p in page.get("CommonPrefixes", [])]
            for o in page.get("Contents", []):
                rel = o["Key"][len(prefix) + 1:]
                if rel:  # "prefix/" itself is a console's empty folder object
                    files[rel] = dict(size=o["Size"], etag=o["ETag"])
    if not files and not subdirs:
        raise StorageError(f"{uri}: no such checkpoint (no objects under this prefix)")
    if UPLOADING in files:
        raise StorageError(f"s3://{bucket}/{prefix}/{MANIFEST}: incomplete upload: a bench upload to {uri} is "
                           f"still running or was interrupted (its {UPLOADING} marker is there, the manifest "
                           f"is not); upload it again")
    if CONFIG not in files:
        sub = f"; its sub-directories are checkpoints of their own: {', '.join(sorted(subdirs)[:4])}" \
            + (", ..." if len(subdirs) > 4 else "") if subdirs else ""
        raise StorageError(f"{uri}: not a checkpoint: no {CONFIG} directly under this prefix "
                           f"(and no {MANIFEST}){sub}")
    for rel in files:
        if rel in (".", ".."):
            raise StorageError(f"s3://{bucket}/{prefix}/{rel}: an object name that cannot be a file; "
                               f"rename or delete it")
    return files


def _plain_file(client, uri: str, key: str, path: Path, want: dict) -> str | None:
    """Download one listed object, pinned to its listed ETag, and check its size and ETag.
    A note when the ETag could not be reproduced and the size was all that was checked."""
    bucket = split_uri(uri)[0]
    etag = want["etag"]
    where = f"s3://{bucket}/{key}"
    changed = f"{where}: changed since {uri} was listed (no longer ETag {etag}); run the command again"
    deleted = f"{where}: deleted since {uri} was listed; run the command again"
    parts = _MULTIPART_ETAG.fullmatch(etag.strip('"'))
    with _Errors(uri, client, missing=deleted, changed=changed):
        head = _head(client, bucket, key, etag, part_number=bool(parts))
        _pin_etag(client, key, etag)
        from boto3.s3.transfer import TransferConfig

        # The classic transfer manager, the one that sends its requests through this client and
        # so through the If-Match of _pin_etag; the CRT one (optional, on some EC2 types) does not.
        client.download_file(bucket, key, str(path), Config=TransferConfig(preferred_transfer_client="classic"))
    size = path.stat().st_size
    if size != want["size"]:
        raise StorageError(f"{where}: downloaded {size} bytes but {uri} lists {want['size']}; "
                           f"run the command again")
    encrypted = head.get("ServerSideEncryption", "").startswith("aws:kms") or head.get("SSECustomerAlgorithm")
    if encrypted:
        return f"{where}: checked by size only (its ETag is not an MD5 under SSE-KMS or SSE-C)"
    if parts is None and not _SINGLE_PART_ETAG.fullmatch(etag.strip('"')):
        return f"{where}: checked by size only (ETag {etag} is not an MD5)"
    if parts is None:
        md5 = _md5_parts(path, size or 1)[0].hex()  # the whole file as one part
        if md5 != etag.strip('"'):
            raise StorageError(f"{where}: the download's MD5 is {md5} but the object's single-part ETag is "
                               f"{etag}; run the command again (a store whose ETags are not MD5s needs a "
                               f"bench upload, checked by SHA-256)")
        return None
    n = int(parts.group(1))
    part1 = head.get("ContentLength") if head.get("PartsCount") else None
    even = _ceil(_ceil(size, n), MiB) * MiB if n else None  # the size shared among n parts, in MiB
    tried = []
    for part_size in (part1, DEFAULT_PART_SIZE, even):
        if not part_size or part_size in tried or _ceil(size, part_size) != n:
            continue
        tried.append(part_size)
        md5s = _md5_parts(path, part_size)
        if f"{hashlib.md5(b''.join(md5s)).hexdigest()}-{n}" == etag.strip('"'):
            return None
    sizes = " or ".join(f"{p / MiB:g} MiB" for p in tried) or "any size that gives that many"
    return (f"{where}: checked by size only (its multipart ETag of {n} parts is not reproduced with parts "
            f"of {sizes}: uploaded in parts of unequal sizes)")


def _head(client, bucket: str, key: str, etag: str, part_number: bool) -> dict:
    """HeadObject on the listed ETag; with ``part_number``, part 1's (its ContentLength is the part
    size and PartsCount is set), unless the store does not take PartNumber on a HEAD."""
    from botocore.exceptions import ClientError

    if part_number:
        try:
            return client.head_object(Bucket=bucket, Key=key, IfMatch=etag, PartNumber=1)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in {"412", "PreconditionFailed", "404", *_DENIED}:
                raise
    return client.head_object(Bucket=bucket, Key=key, IfMatch=etag)


def _pin_etag(client, key: str, etag: str) -> None:
    """Make every HEAD and GET of ``key`` through ``client`` conditional on ``etag`` (``If-Match``),
    so the transfer manager's ranged GETs fail with 412 when the object is replaced under them
    rather than mix two versions. botocore's documented event hook, once per key and client."""
    def if_match(params, **_):
        if params.get("Key") == key:
            params.setdefault("IfMatch", etag)

    for operation in ("HeadObject", "GetObject"):
        client.meta.events.register(f"before-parameter-build.s3.{operation}", if_match,
                                    unique_id=f"bench-if-match-{operation}-{key}")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _md5_parts(path: Path, part_size: int) -> list[bytes]:
    """The MD5 digest of each ``part_size`` bytes of the file, read a MiB at a time."""
    digests = []
    with open(path, "rb") as f:
        while True:
            h, left = hashlib.md5(), part_size
            while left and (chunk := f.read(min(left, MiB))):
                h.update(chunk)
                left -= len(chunk)
            if left == part_size and digests:
                return digests
            digests.append(h.digest())
            if left:
                return digests


# -- writing -----------------------------------------------------------------------------

def upload_checkpoint(local_dir: str | Path, uri: str) -> bool:
    """Upload the files of ``local_dir`` (not its sub-directories) to ``uri``, the manifest last.

    Returns False when ``uri`` already holds exactly these files (same manifest) and nothing
    was sent. The ``UPLOADING`` marker is written first and an old manifest deleted before any
    file is replaced; the marker goes once the new manifest is there. So a reader during the
    upload, or after an interrupted one, sees an incomplete upload rather than mixed files, and
    does not take the prefix for a plain directory.
    """
    local_dir = Path(local_dir)
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise StorageError(f"{uri}: name a prefix inside the bucket (s3://{bucket}/PREFIX)")
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: not a directory to upload")
    files = sorted(p for p in local_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name not in (MANIFEST, UPLOADING))
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
        _mark_in_progress(client, bucket, prefix, "upload")
        client.delete_object(Bucket=bucket, Key=key)
        for p in files:
            client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{UPLOADING}")
    return True


def _mark_in_progress(client, bucket: str, prefix: str, what: str) -> None:
    """Write the ``UPLOADING`` marker: until it is deleted, a prefix without a manifest is refused."""
    body = json.dumps(dict(format=MANIFEST_FORMAT, note=f"a bench {what} of this prefix is running or was "
                           f"interrupted; the checkpoint is complete only with {MANIFEST}")) + "\n"
    client.put_object(Bucket=bucket, Key=f"{prefix}/{UPLOADING}", Body=body.encode(),
                      ContentType="application/json")


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
    """Remove the checkpoint at ``uri``: the ``UPLOADING`` marker is written first and deleted last,
    and the manifest goes before the files, so it is never seen half deleted."""
    bucket, prefix = split_uri(uri)
    client = _client()
    marker = f"{prefix}/{UPLOADING}"
    with _Errors(uri, client):
        _mark_in_progress(client, bucket, prefix, "delete")
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/",
                                                                     Delimiter="/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["Key"] != marker]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_object(Bucket=bucket, Key=marker)


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
