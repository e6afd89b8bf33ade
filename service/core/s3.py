"""The S3-compatible backend of `Storage` (AWS, MinIO, Ceph, R2), on boto3.

Objects live under `s3://bucket/prefix/<key>`. A folder (a checkpoint) is its objects plus
`<key>/.rft-manifest.json`, written last, naming each object's size, sha256 and write time: a folder
without its manifest was never committed and reads as missing. Local copies go under `cache_dir`
with the same layout; a fetched folder's files are checked against the manifest and get back their
write times, so an archive built from them is byte-for-byte the one any other host builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.core.private import make_tree_private, open_private, private_dir, write_private
from service.core.settings import Settings
from service.core.storage import CHUNK, Storage, Writer, check_key, sha256_of

MANIFEST = ".rft-manifest.json"
PART_BYTES = 8 * 1024 * 1024  # multipart part size: the most an upload holds in memory
_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>[A-Za-z0-9_.\-/]*))?$")
_stores: dict[tuple[Any, ...], S3Storage] = {}
_stores_lock = threading.Lock()


class StorageCorrupt(RuntimeError):
    """A stored object does not match what its manifest or database row says it is."""


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; ValueError naming what is wrong otherwise."""
    match = _URL.match(url)
    if match is None:
        raise ValueError(
            f"RFT_STORAGE_URL={url!r} is not an S3 URL: use s3://bucket or s3://bucket/prefix "
            "(bucket names are 3-63 lowercase letters, digits, dots and hyphens)"
        )
    return match["bucket"], (match["prefix"] or "").strip("/")


class S3Storage(Storage):
    def __init__(self, settings: Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        super().__init__(private_dir(settings.cache_dir))
        self.url = settings.storage_url
        self.bucket, self.prefix = parse_url(settings.storage_url)
        self.presign = settings.s3_presigned_downloads
        self.presign_seconds = settings.s3_presign_seconds
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=16,
        )
        session = boto3.session.Session(
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
            region_name=settings.s3_region or None,
        )
        self.endpoint = settings.s3_endpoint_url or None
        self.client = session.client("s3", endpoint_url=self.endpoint, config=config)
        # Presigned URLs must name a host the user's machine reaches (MinIO inside compose is `minio:9000`).
        public = settings.s3_presign_endpoint_url or self.endpoint
        self.presigner = (
            self.client if public == self.endpoint else session.client("s3", endpoint_url=public, config=config)
        )
        self.transfer = TransferConfig(
            multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=4
        )
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    @classmethod
    def of(cls, settings: Settings) -> S3Storage:
        """One store (and one boto3 client, which is thread-safe) per configuration and process."""
        config = (
            settings.storage_url,
            settings.s3_endpoint_url,
            settings.s3_presign_endpoint_url,
            settings.s3_region,
            settings.s3_access_key_id,
            settings.s3_secret_access_key,
            settings.s3_presigned_downloads,
            settings.s3_presign_seconds,
            str(settings.cache_dir),
        )
        with _stores_lock:
            if config not in _stores:
                _stores[config] = cls(settings)
            return _stores[config]

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            where = f" at {self.endpoint}" if self.endpoint else ""
            raise RuntimeError(
                f"The object store {self.url}{where} cannot be used: {exc}. Check RFT_STORAGE_URL, "
                "RFT_S3_ENDPOINT_URL and the credentials (RFT_S3_ACCESS_KEY_ID / RFT_S3_SECRET_ACCESS_KEY "
                "or the usual AWS settings), and that the bucket exists."
            ) from exc

    def writer(self, key: str) -> Writer:
        return _MultipartWriter(self, self._name(key))

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._name(key), Config=self.transfer)
        path.unlink(missing_ok=True)

    def iter_bytes(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        span = f"bytes={start}-{'' if end is None else end}"
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key), Range=span)["Body"]
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no stored object {key!r}") from exc
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def delete(self, key: str) -> None:
        name = self._name(key)
        self.client.delete_object(Bucket=self.bucket, Key=name)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{name}/")
        for page in pages:
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:  # at most 1000 a page, as delete_objects takes
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        self.drop_local(key)

    def drop_local(self, key: str) -> None:
        local = self.local_path(key)
        with self._lock(key):
            shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
            _marker(local).unlink(missing_ok=True)

    def commit_dir(self, staging: Path, key: str) -> None:
        make_tree_private(staging)
        self.delete(key)  # what a crashed attempt left (it has no manifest and no row; nothing reads it)
        files = []
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            name = file.relative_to(staging).as_posix()
            self.client.upload_file(str(file), self.bucket, self._name(f"{key}/{name}"), Config=self.transfer)
            stat = file.stat()
            files.append({"name": name, "bytes": stat.st_size, "sha256": sha256_of(file), "mtime": stat.st_mtime})
        manifest = json.dumps({"files": files}, indent=1).encode()
        self.put_bytes(f"{key}/{MANIFEST}", manifest)  # last: now the folder exists
        target = self.local_path(key)  # the staging folder becomes this host's copy
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        write_private(_marker(target), manifest)

    def local_path(self, key: str) -> Path:
        return self.cache_dir / check_key(key)

    def local_file(self, key: str, sha256: str | None = None) -> Path:
        target = self.local_path(key)
        with self._lock(key):
            if not target.is_file():
                partial = private_dir(target.parent) / f".{target.name}.{uuid.uuid4().hex}.fetch"
                try:
                    self._download(key, partial, sha256=sha256)
                    os.replace(partial, target)
                finally:
                    partial.unlink(missing_ok=True)
        return target

    def local_dir(self, key: str) -> Path:
        target = self.local_path(key)
        with self._lock(key):
            if _marker(target).is_file() and target.is_dir():  # a committed folder never changes
                return target
            try:
                raw = self.read_bytes(f"{key}/{MANIFEST}")
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"no committed folder {key!r} in {self.url}") from exc
            partial = private_dir(target.with_name(f".{target.name}.{uuid.uuid4().hex}.fetch"))
            try:
                for entry in json.loads(raw)["files"]:
                    dest = partial / entry["name"]
                    private_dir(dest.parent)
                    self._download(f"{key}/{entry['name']}", dest, sha256=entry["sha256"])
                    os.utime(dest, (entry["mtime"], entry["mtime"]))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(partial, target)
                write_private(_marker(target), raw)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return target

    def _download(self, key: str, dest: Path, sha256: str | None) -> None:
        """One streamed GET, hashed on the way to the file (no second read to check it). boto3's ranged
        parallel download took 129 s to restore a 1.5 GiB checkpoint from moto, this 6.4-8.5 s
        (bench/checkpoint_store_bench.py); a real store may favour ranges, to be measured there."""
        digest = hashlib.sha256()
        with open_private(dest) as out:
            for chunk in self.iter_bytes(key):
                digest.update(chunk)
                out.write(chunk)
        if sha256 is not None and (found := digest.hexdigest()) != sha256:
            raise StorageCorrupt(f"stored object {key!r} has sha256 {found}, expected {sha256}")

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    def download_url(self, key: str, filename: str) -> str | None:
        if not self.presign:
            return None
        params = {
            "Bucket": self.bucket,
            "Key": self._name(key),
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        url: str = self.presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_seconds)
        return url


def _marker(local: Path) -> Path:
    """Beside a fetched folder, not in it: the archive's member times come from the folder's files."""
    return local.with_name(f".{local.name}.manifest")


class _MultipartWriter(Writer):
    """Buffers at most one part; an object under one part is a single PUT."""

    def __init__(self, store: S3Storage, name: str) -> None:
        self.store, self.name = store, name
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= PART_BYTES:
            self._send(bytes(self.buffer[:PART_BYTES]))
            del self.buffer[:PART_BYTES]

    def _send(self, part: bytes) -> None:
        client, bucket = self.store.client, self.store.bucket
        if self.upload_id is None:
            self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=self.name)["UploadId"]
        number = len(self.parts) + 1
        sent = client.upload_part(Bucket=bucket, Key=self.name, UploadId=self.upload_id, PartNumber=number, Body=part)
        self.parts.append({"ETag": sent["ETag"], "PartNumber": number})

    def commit(self) -> None:
        client, bucket = self.store.client, self.store.bucket
        if self.upload_id is None:
            client.put_object(Bucket=bucket, Key=self.name, Body=bytes(self.buffer))
        else:
            if self.buffer:
                self._send(bytes(self.buffer))
            client.complete_multipart_upload(
                Bucket=bucket, Key=self.name, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
            )
        self.buffer, self.upload_id = bytearray(), None  # an abort after this is a no-op

    def abort(self) -> None:
        self.buffer = bytearray()
        if self.upload_id is not None:
            self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.name, UploadId=self.upload_id)
            self.upload_id = None
