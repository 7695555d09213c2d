"""Conditional writes to an S3-compatible store, for the registry's writers on different machines.

pyarrow's filesystem (pipelines.artifacts.storage) has no conditional put, so the few small objects that writers
race for (index.json, audit.jsonl, a version's claim) go through boto3:

    store = ObjectStore("s3://bucket/registry")
    body, etag = store.get("index.json")                 # (None, None) when there is no such object
    store.put("index.json", new, if_match=etag)          # False: someone wrote it since it was read
    store.put("models/city/3/registry.json", rec, create=True)   # False: that key exists already

S3 honours `If-None-Match: *` and `If-Match` on PutObject (since 2024), as do MinIO and moto; a store that
answers a conditional put with 501 NotImplemented is refused with a StorageError naming it, never written to
unconditionally. Endpoint and credentials come from the same variables as pipelines.artifacts.storage.
"""

from __future__ import annotations

import os

from pipelines.artifacts.storage import StorageError

CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class ObjectStore:
    """The objects under one s3:// prefix, read with their ETag and written conditionally."""

    def __init__(self, uri: str):
        scheme, _, rest = str(uri).partition("://")
        if scheme != "s3":
            raise StorageError(f"{uri}: concurrent registry writes need an s3:// store (conditional puts)")
        self.uri = str(uri).rstrip("/")
        self.bucket, _, prefix = rest.strip("/").partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        import boto3
        from botocore.config import Config

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.client = boto3.client("s3", endpoint_url=endpoint(), region_name=region, config=Config(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}))

    def get(self, rel: str) -> tuple[bytes | None, str | None]:
        """(bytes, ETag) of the object, (None, None) when there is none."""
        try:
            out = self._call("get", rel, lambda: self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel))
        except _Missing:
            return None, None
        return out["Body"].read(), out["ETag"]

    def put(self, rel: str, body: bytes, *, if_match: str | None = None, create: bool = False) -> bool:
        """Write the object when its ETag is still `if_match` (or, with `create`, when there is none yet); False
        when that condition no longer holds (another writer was first), True once written."""
        kwargs: dict = {"Bucket": self.bucket, "Key": self.prefix + rel, "Body": body}
        if create:
            kwargs["IfNoneMatch"] = "*"
        elif if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            self._call("put", rel, lambda: self.client.put_object(**kwargs))
        except _Conflict:
            return False
        except _Missing:  # If-Match on an object deleted since it was read
            return False
        return True

    def _call(self, what: str, rel: str, fn):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in ("NoSuchKey", "404") or status == "404":
                raise _Missing() from None
            if code in CONFLICT or status in CONFLICT:
                raise _Conflict() from None
            if status == "501" or code == "NotImplemented":
                raise StorageError(f"{self.uri}/{rel}: the store does not support conditional writes ({code}); "
                                   "a registry shared by several writers needs them (S3, MinIO and moto have "
                                   "them)") from None
            raise StorageError(f"{self.uri}/{rel}: {what} refused by the store ({code}: "
                               f"{e.response.get('Error', {}).get('Message', '')})") from None
        except BotoCoreError as e:
            raise StorageError(f"{self.uri}/{rel}: the store does not answer ({endpoint() or 'AWS'}: {e}); check "
                               "the bucket, AWS_ENDPOINT_URL and the AWS credentials") from None


class _Missing(Exception):
    pass


class _Conflict(Exception):
    pass
