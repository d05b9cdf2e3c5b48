"""s3:// sources and exports, through boto3 (any S3-compatible store: an endpoint URL).

Sources: every `s3://bucket/key-or-prefix` string a recipe names (the model, a reference, a dataset
file or directory) is fetched once into `object_store.sources_dir` on the run's volume and the
recipe is given the local path instead. A key that is an object is one file; otherwise every object
under `prefix/` is a directory. Each file is downloaded beside its place, its size checked (and its
MD5 against a single-part ETag), and the whole source renamed into place with a manifest only once
complete: a later stage, a rerun or another rank finds it there and reads no byte from the store.

Exports: a local directory (a stage's final/) is written under `s3://bucket/prefix/`, each object
read back (HEAD: size, and the SHA-256 the upload stored in its metadata) and only then is the
manifest `prefix/_EXPORT_COMPLETE.json` written (files, bytes, digest): a reader that trusts the
manifest never sees a partial model. An interrupted export leaves no manifest and is redone.

Credentials: boto3's own chain only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from a Secret through
secretKeyRef, or the pod's service account: web identity, instance roles); never in a recipe, a
message or a result. Failures name the URI and the endpoint, never a key:
- a missing bucket or key, refused credentials: ObjectStoreError (exit 2: fix the input);
- an endpoint that does not answer: ObjectStoreUnreachable (retryable).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

EXPORT_MANIFEST = "_EXPORT_COMPLETE.json"
FETCH_MANIFEST = ".fetched.json"
DIGEST_KEY = "sha256"  # x-amz-meta-sha256 on each exported object


class ObjectStoreError(ValueError):
    """What a retry will not fix: a missing bucket or key, credentials the store refuses."""


class ObjectStoreUnreachable(RuntimeError):
    """The endpoint did not answer (refused, timed out, DNS): a retry may succeed."""


def is_s3(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # without a leading '/'; '' is the whole bucket

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not is_s3(uri):
            raise ObjectStoreError(f"{uri!r} is not an s3:// URI")
        rest = uri[len("s3://"):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ObjectStoreError(f"{uri!r}: no bucket (s3://bucket/prefix)")
        return cls(bucket, key.strip("/") if key.endswith("/") else key.lstrip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> "S3Uri":
        return S3Uri(self.bucket, f"{self.key.rstrip('/')}/{name}" if self.key else name)


def client(endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client: path-style addressing (S3-compatible stores), bounded retries and timeouts."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": int(os.environ.get("ALIGNMENT_S3_MAX_ATTEMPTS", "4")), "mode": "standard"},
                    connect_timeout=10, read_timeout=120, s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=config)


def _where(uri: S3Uri | str, s3) -> str:
    endpoint = getattr(getattr(s3, "meta", None), "endpoint_url", None)
    return f"{uri} (endpoint {endpoint})" if endpoint else str(uri)


def explain(exc: BaseException, uri: S3Uri | str, s3, doing: str) -> Exception:
    """The failure for a boto3/botocore exception: what failed, the URI and endpoint, what to check."""
    from botocore.exceptions import (ClientError, ConnectionClosedError, EndpointConnectionError, NoCredentialsError,
                                     ReadTimeoutError, ConnectTimeoutError)

    where = _where(uri, s3)
    if isinstance(exc, (ObjectStoreError, ObjectStoreUnreachable)):
        return exc
    # boto3's transfers wrap the client's error (S3UploadFailedError): judge by what the store answered.
    inner = exc.__cause__ or exc.__context__
    while inner is not None and not isinstance(inner, (ClientError, EndpointConnectionError, NoCredentialsError)):
        inner = inner.__cause__ or inner.__context__
    if inner is not None and not isinstance(exc, (ClientError, EndpointConnectionError, NoCredentialsError)):
        exc = inner
    if isinstance(exc, NoCredentialsError):
        return ObjectStoreError(f"{doing} {where}: no credentials: give objectStore.credentialsSecretName (keys "
                                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a service account with access")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        return ObjectStoreUnreachable(f"{doing} {where}: the endpoint did not answer ({type(exc).__name__}); check "
                                      "objectStore.endpointUrl and that the store is up and reachable from the pod")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
                    "403", "AllAccessDisabled") or status == 403:
            return ObjectStoreError(f"{doing} {where}: the store refused the credentials ({code or status}); check "
                                    "the Secret's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the service account's "
                                    "access to the bucket")
        if code in ("NoSuchBucket",):
            return ObjectStoreError(f"{doing} {where}: no such bucket {getattr(uri, 'bucket', '')!r}; check the URI")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return ObjectStoreError(f"{doing} {where}: no such object or prefix; check the URI")
        if status is not None and status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return ObjectStoreUnreachable(f"{doing} {where}: the store failed ({code or status}); retry later")
        return ObjectStoreError(f"{doing} {where}: {code or status}: {err.get('Message', '')}".rstrip(": "))
    return ObjectStoreUnreachable(f"{doing} {where}: {type(exc).__name__}: {exc}")


def _listing(s3, uri: S3Uri) -> list[dict]:
    """The objects a source names: the key itself when it is an object, else everything under key/."""
    from botocore.exceptions import ClientError

    if uri.key and not uri.key.endswith("/"):
        try:
            head = s3.head_object(Bucket=uri.bucket, Key=uri.key)
            return [{"Key": uri.key, "Size": head["ContentLength"], "ETag": head.get("ETag", ""), "rel": ""}]
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                raise
    prefix = f"{uri.key.rstrip('/')}/" if uri.key else ""
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix):]
            if rel and not rel.endswith("/"):
                objects.append({"Key": o["Key"], "Size": o["Size"], "ETag": o.get("ETag", ""), "rel": rel})
    if not objects:
        raise ObjectStoreError(f"reading {_where(uri, s3)}: no such object, and no objects under {prefix or '/'}; "
                               "check the URI")
    return objects


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def local_path(uri: str, sources_dir: str | Path) -> Path:
    u = S3Uri.parse(uri)
    return Path(sources_dir, u.bucket, *[p for p in u.key.split("/") if p])


def fetch(uri: str, sources_dir: str | Path, endpoint_url: str | None = None, region: str | None = None,
          log=None) -> Path:
    """The local copy of `uri` under sources_dir (fetched now unless a complete copy is there)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    u = S3Uri.parse(uri)
    dest = local_path(uri, sources_dir)
    manifest = dest.parent / f"{dest.name}{FETCH_MANIFEST}"
    if manifest.exists() and dest.exists():
        log(f"{uri}: using the copy fetched earlier ({dest})")
        return dest
    s3 = client(endpoint_url, region)
    try:
        objects = _listing(s3, u)
        total = sum(o["Size"] for o in objects)
        tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True, exist_ok=True)
        done, started = 0, time.monotonic()
        for i, o in enumerate(objects, 1):
            target = tmp / o["rel"] if o["rel"] else tmp / dest.name
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(u.bucket, o["Key"], str(target))
            size = target.stat().st_size
            if size != o["Size"]:
                raise ObjectStoreUnreachable(f"reading {_where(u.child(o['rel']) if o['rel'] else u, s3)}: got {size} "
                                             f"bytes of {o['Size']}; retry")
            etag = o["ETag"].strip('"')
            if etag and "-" not in etag and len(etag) == 32 and _md5(target) != etag:
                raise ObjectStoreError(f"reading s3://{u.bucket}/{o['Key']}: its bytes do not match its ETag (MD5)")
            done += size
            log(f"fetching {uri}: {i}/{len(objects)} files, {_human(done)} of {_human(total)} "
                f"({time.monotonic() - started:.1f}s)")
    except Exception as e:  # noqa: BLE001 - every store failure is named with its URI
        shutil.rmtree(locals().get("tmp", dest.parent / ".none"), ignore_errors=True)
        raise explain(e, u, s3, "reading") from None
    single = len(objects) == 1 and objects[0]["rel"] == ""
    src = tmp / dest.name if single else tmp
    try:
        os.rename(src, dest)
    except OSError:
        if not dest.exists():
            raise
        log(f"{uri}: another process fetched it first; using {dest}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_atomic(manifest, {"uri": uri, "files": len(objects), "bytes": total,
                            "objects": [{"key": o["Key"], "size": o["Size"], "etag": o["ETag"].strip('"')}
                                        for o in objects]})
    return dest


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def localize(data: Any, sources_dir: str | Path, endpoint_url: str | None = None, region: str | None = None) -> Any:
    """`data` (a recipe's mapping) with every s3:// string replaced by its fetched local path."""
    if isinstance(data, dict):
        return {k: localize(v, sources_dir, endpoint_url, region) for k, v in data.items()}
    if isinstance(data, list):
        return [localize(v, sources_dir, endpoint_url, region) for v in data]
    if is_s3(data):
        return str(fetch(data, sources_dir, endpoint_url, region))
    return data


def fetch_sources(recipe):
    """The recipe with every s3:// source replaced by its copy on the volume (fetched once); its
    exports (destinations) stay as they are. Sources go to object_store.sources_dir, default the
    run's directory's sources/ (beside the stages' directories: every stage of the run reuses them)."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    kept = {k: data.pop(k) for k in ("exports", "base_model") if k in data}  # destinations, provenance
    if not any(is_s3(v) for v in _strings(data)):
        return recipe
    store = recipe.object_store
    sources = store.sources_dir if store and store.sources_dir else str(Path(recipe.output_dir).parent / "sources")
    local = localize(data, sources, store.endpoint_url if store else None, store.region if store else None)
    return type(recipe).model_validate({**local, **kept})


def _strings(data):
    if isinstance(data, dict):
        for v in data.values():
            yield from _strings(v)
    elif isinstance(data, list):
        for v in data:
            yield from _strings(v)
    else:
        yield data


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            yield path.relative_to(folder).as_posix(), path


def export_files(folder: Path, replace: dict[str, bytes] | None = None) -> tuple[list[tuple], int, str]:
    """What an export writes: [(path in the export, Path or bytes, size, sha256)], their bytes, and the
    export's digest (sha256 of the sorted "<sha256>  <path>" lines; the same for any target)."""
    replace = replace or {}
    files = [(rel, path, path.stat().st_size, sha256(path)) if rel not in replace else
             (rel, replace[rel], len(replace[rel]), hashlib.sha256(replace[rel]).hexdigest())
             for rel, path in _files(Path(folder))]
    if set(replace) - {f[0] for f in files}:  # a file the folder lacks (a model without a card): added
        files = sorted([*files, *((rel, body, len(body), hashlib.sha256(body).hexdigest())
                                  for rel, body in replace.items() if rel not in {f[0] for f in files})])
    digest = hashlib.sha256("".join(f"{d}  {r}\n" for r, _, _, d in files).encode()).hexdigest()
    return files, sum(f[2] for f in files), digest


def export(folder: str | Path, uri: str, endpoint_url: str | None = None, region: str | None = None,
           attempts: int = 3, log=None, replace: dict[str, bytes] | None = None) -> dict:
    """Write `folder` under `uri`, verify every object, then write the completion manifest.

    `replace`: files written from these bytes instead of the folder's (the model card with where it
    was exported: README.md). Returns {uri, digest (sha256 of the manifest's sorted file digests),
    bytes, files, seconds, attempts}. A failure is tried again (`attempts` in all) from the objects
    not yet verified; the last one raises with the URI named. The manifest is never written before
    every object is verified.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    folder = Path(folder)
    u = S3Uri.parse(uri.rstrip("/") + "/")
    files, total, digest = export_files(folder, replace)
    if not files:
        raise ObjectStoreError(f"exporting {folder} to {uri}: nothing to export (no files)")
    s3 = client(endpoint_url, region)
    started, verified, attempt = time.monotonic(), set(), 0
    try:
        done = exported(uri, endpoint_url, region)
    except (ObjectStoreError, ObjectStoreUnreachable):  # the writes below say what is wrong, and retry
        done = None
    if done is not None and done.get("sha256") == digest:  # the same files, complete: nothing to write
        log(f"{uri}: already exported (sha256:{digest[:12]}...)")
        return {"uri": str(u).rstrip("/"), "digest": f"sha256:{digest}", "bytes": total, "files": len(files),
                "seconds": 0.0, "attempts": 0}
    while True:
        attempt += 1
        try:
            for rel, path, size, file_digest in files:
                if rel in verified:
                    continue
                key = u.child(rel)
                if isinstance(path, bytes):
                    s3.put_object(Bucket=u.bucket, Key=key.key, Body=path, Metadata={DIGEST_KEY: file_digest})
                else:
                    s3.upload_file(str(path), u.bucket, key.key, ExtraArgs={"Metadata": {DIGEST_KEY: file_digest}})
                head = s3.head_object(Bucket=u.bucket, Key=key.key)
                if head["ContentLength"] != size or head.get("Metadata", {}).get(DIGEST_KEY) != file_digest:
                    raise ObjectStoreUnreachable(f"exporting {_where(key, s3)}: read back {head['ContentLength']} "
                                                 f"bytes, digest {head.get('Metadata', {}).get(DIGEST_KEY)}; "
                                                 f"wrote {size}, {file_digest}")
                verified.add(rel)
                log(f"exporting to {uri}: {len(verified)}/{len(files)} files verified")
            manifest = {"files": [{"path": r, "bytes": s, "sha256": d} for r, _, s, d in files],
                        "bytes": total, "sha256": digest}
            body = json.dumps(manifest, indent=1).encode()
            s3.put_object(Bucket=u.bucket, Key=u.child(EXPORT_MANIFEST).key, Body=body,
                          ContentType="application/json")
            return {"uri": str(u).rstrip("/"), "digest": f"sha256:{digest}", "bytes": total, "files": len(files),
                    "seconds": round(time.monotonic() - started, 2), "attempts": attempt}
        except Exception as e:  # noqa: BLE001 - named, then retried or raised
            failure = explain(e, u, s3, "exporting to")
            if isinstance(failure, ObjectStoreError) or attempt >= attempts:
                raise failure from None
            log(f"{failure}; try {attempt + 1} of {attempts} in {2 ** attempt} s")
            time.sleep(2 ** attempt)


def exported(uri: str, endpoint_url: str | None = None, region: str | None = None) -> dict | None:
    """The completion manifest of an export, or None when it is not (yet) complete."""
    from botocore.exceptions import ClientError

    u = S3Uri.parse(uri.rstrip("/") + "/")
    s3 = client(endpoint_url, region)
    try:
        body = s3.get_object(Bucket=u.bucket, Key=u.child(EXPORT_MANIFEST).key)["Body"].read()
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise explain(e, u, s3, "reading") from None
    return json.loads(body)
