"""Where stores and runs live: a local path, or a URI that `pyarrow.fs` reaches (s3://, gs://, file://).

`resolve` turns what a user typed (`--data`, `--out`, `--resume`, `--checkpoint`, run.out_dir) into a `Location`:
a pyarrow FileSystem and the path inside it. Every read and write of a store, run folder or checkpoint goes
through one, so the same code runs on a laptop's disk, a shared NFS mount or a bucket. A Location pickles
with its filesystem (endpoint included), so Ray tasks and Train workers use the one the driver resolved.

Facts this relies on (pyarrow 25, Ray 2.60):
- pyarrow ignores AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (apache/arrow#49643), which boto3 and the AWS CLI
  honour: `resolve` passes it as `endpoint_override`. Credentials are not pickled: each process finds its
  own (env vars, ~/.aws, instance profile), so `worker_env` forwards the driver's to Ray's workers.
- S3 cannot rename a folder (`move` copies each object); local folders rename atomically.
- pyarrow's GCS client retries a failing call for 15 minutes by default, so an unreachable endpoint would hang
  the bucket check that long: the check uses its own filesystem with `retry_limit_seconds` set.
- Ray Train takes `storage_filesystem` with `storage_path` stripped of its scheme (`bucket/runs`).
- Local paths are made absolute here, on the driver: Train V2 rejects a relative storage path, and a job's
  working directory is not where workers on other nodes look.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

from ajepa.config import ConfigError

SCHEMES = ("file", "s3", "gs", "gcs")
GCS_SCHEMES = ("gs", "gcs")
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the AWS SDKs' names, most specific first
# What a worker needs to reach the same buckets as the driver, when they come from the environment.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
                  "AWS_PROFILE", *ENDPOINT_ENV, "GOOGLE_APPLICATION_CREDENTIALS")
GCS_CHECK_RETRY_SECONDS = 15  # how long the bucket check of a gs:// URI retries before it names the URI and stops
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = pafs.LocalFileSystem()
_reachable: set[tuple[str, str, str, bool]] = set()  # (scheme, bucket, query with any endpoint, anonymous) checked


class StorageError(ConfigError):
    """A path or URI cannot be used: unknown scheme, missing bucket, unreachable storage. Names the URI."""


@dataclass(frozen=True)
class Location:
    """A file or folder: `path` inside `fs`. `str()` gives the absolute local path or the URI."""

    fs: pafs.FileSystem
    path: str
    scheme: str = ""  # "" on the local disk
    query: str = ""  # the URI's options (e.g. endpoint_override), kept so that joined URIs resolve the same
    anonymous: bool = False  # gs://anonymous@bucket/...: a public bucket, read without credentials

    def __str__(self) -> str:
        if self.is_local:
            return self.path
        user = "anonymous@" if self.anonymous else ""
        return f"{self.scheme}://{user}{self.path}" + (f"?{self.query}" if self.query else "")

    def __fspath__(self) -> str:
        """Local files pass to APIs that open paths (torch, safetensors, matplotlib); a URI is refused."""
        if not self.is_local:
            raise TypeError(f"{self}: not on this machine's disk")
        return self.path

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __truediv__(self, name: str) -> Location:
        return dataclasses.replace(self, path=f"{self.path.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> Location:
        return dataclasses.replace(self, path=str(PurePosixPath(self.path).parent))

    # ------------------------------------------------------------------------------------------ queries
    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def files(self, recursive: bool = False) -> list[Location]:
        """The entries in this folder (every file below it with `recursive`), by path; [] when it is missing.

        A GCS folder's entries come from every object below it: pyarrow lists a GCS subfolder only where it wrote
        a marker object for it, and files written straight to a path (as every writer here does) make none."""
        deep = recursive or self.scheme in GCS_SCHEMES
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=deep, allow_not_found=True))
        if recursive:
            paths = {i.path for i in infos if i.type == pafs.FileType.File}
        else:
            prefix = self.path.rstrip("/") + "/"
            paths = {prefix + i.path[len(prefix):].split("/", 1)[0] for i in infos
                     if i.type in (pafs.FileType.File, pafs.FileType.Directory)}
        return [dataclasses.replace(self, path=path) for path in sorted(paths)]

    def glob(self, pattern: str) -> list[Location]:
        """Files below this folder whose relative path matches `pattern` part by part (`step_*/*.pt`), by path."""
        parts = pattern.split("/")
        found = []
        for f in self.files(recursive=True):
            rel = PurePosixPath(f.path).relative_to(self.path).parts
            if len(rel) == len(parts) and all(fnmatch.fnmatchcase(r, p) for r, p in zip(rel, parts, strict=True)):
                found.append(f)
        return found

    # ------------------------------------------------------------------------------------ small files
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as fh:
            return fh.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        if self.is_local:  # object stores have no folders to make
            self.parent.mkdir()
        with self.fs.open_output_stream(self.path) as fh:
            fh.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    # ---------------------------------------------------------------------------------------- folders
    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """This folder with everything in it, or this file."""
        if self.is_dir():
            try:
                self.fs.delete_dir(self.path)
            except FileNotFoundError:  # GCS: the folder's marker object, which pyarrow deletes last, was never made
                if self.exists():
                    raise
        else:
            self.fs.delete_file(self.path)

    def move_to(self, dest: Location) -> None:
        """A rename on a local disk (atomic); on object storage a copy of each object, then a delete."""
        if self.is_local and dest.is_local:
            self.fs.move(self.path, dest.path)
            return
        pafs.copy_files(self.path, dest.path, source_filesystem=self.fs, destination_filesystem=dest.fs)
        self.delete()

    def upload(self, local: Path) -> None:
        """Copy a local file, or a local folder's contents, to here."""
        if self.is_local:  # copy_files makes the sub-folders of a folder it copies, not the folder itself
            (self if local.is_dir() else self.parent).mkdir()
        pafs.copy_files(str(local), self.path, source_filesystem=_LOCAL, destination_filesystem=self.fs)

    def upload_whole(self, local: Path) -> None:
        """Copy a local file to here so that readers see all of it or nothing, even if this process dies during
        the copy: on a local disk it is written under a hidden name in the same folder and renamed (atomic); in
        object storage an object appears only once its upload completes."""
        if not self.is_local:
            self.upload(local)
            return
        partial = self.parent / f".{self.name}.partial"
        partial.upload(local)
        partial.move_to(self)

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """This file or folder as a local path: itself on a local disk, else a temporary download."""
        if self.is_local:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="ajepa-") as tmp:
            local = Path(tmp) / self.name
            pafs.copy_files(self.path, str(local), source_filesystem=self.fs, destination_filesystem=_LOCAL)
            yield local

    @contextlib.contextmanager
    def local_file(self) -> Iterator[Path]:
        """A local path to write this file at (for writers that take paths): the file itself on a local disk,
        else a temporary file, uploaded here when the body ends without an error."""
        if self.is_local:
            self.parent.mkdir()
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="ajepa-") as tmp:
            local = Path(tmp) / self.name
            yield local
            self.upload(local)

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for Ray's RunConfig: a URI's path goes with its filesystem."""
        return (self.path, None) if self.is_local else (self.path, self.fs)


def is_uri(where: str | os.PathLike[str]) -> bool:
    return bool(_URI.match(os.fspath(where)))


def resolve(where: str | os.PathLike[str] | Location) -> Location:
    """A local path (made absolute) or a URI as a Location. A URI's bucket is checked once per process, so that
    a typo or missing credentials stop a job before it starts, with the URI in the message."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    match = _URI.match(text)
    if not match:
        head = text.split("/", 1)[0]
        if head.endswith(":") and head[:-1].lower() in SCHEMES:  # what `Path("s3://b/x")` makes of a URI
            raise StorageError(f"{text}: looks like a URI that lost a slash; write {head}//...")
        return Location(_LOCAL, str(Path(text).expanduser().absolute()))
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{text}: unknown storage scheme {scheme}://; use a local path or one of "
                           f"{', '.join(s + '://' for s in SCHEMES)}")
    uri = text
    if scheme == "s3" and (endpoint := next((os.environ[k] for k in ENDPOINT_ENV if os.environ.get(k)), None)):
        uri = _with_default_options(text, endpoint_override=endpoint)
    fs, path = _from_uri(uri, text)
    if isinstance(fs, pafs.LocalFileSystem):  # file://
        return Location(_LOCAL, path)
    # The user's query only: an endpoint from the environment stays out of printed and recorded URIs.
    # Of a URI's user part only GCS's "anonymous" is kept: anything else (s3://key:secret@...) stays out of print.
    typed = urlsplit(text)
    anonymous = scheme in GCS_SCHEMES and typed.username == "anonymous"
    location = Location(fs, path.rstrip("/"), scheme, typed.query, anonymous)
    bucket = location.path.split("/", 1)[0]
    checked = (scheme, bucket, urlsplit(uri).query, anonymous)  # the endpoint from the environment included
    if checked not in _reachable:
        check_fs = location.fs
        if scheme in GCS_SCHEMES:
            check_fs = _from_uri(_with_default_options(uri, retry_limit_seconds=GCS_CHECK_RETRY_SECONDS), text)[0]
        _check_bucket(check_fs, bucket, text)
        _reachable.add(checked)
    return location


def _from_uri(uri: str, text: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError; a region lookup failure an OSError
        raise StorageError(f"{text}: {exc}") from None


def _with_default_options(uri: str, **options: str | int) -> str:
    """The URI with `options` added to its query, except those it names itself."""
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode({**options, **query})))


def _check_bucket(fs: pafs.FileSystem, bucket: str, text: str) -> None:
    try:
        kind = fs.get_file_info(bucket).type
    except OSError as exc:
        raise StorageError(f"{text}: cannot reach the storage ({exc})") from None
    if kind != pafs.FileType.Directory:
        raise StorageError(f"{text}: bucket {bucket!r} does not exist, or these credentials cannot see it")


def worker_env() -> dict[str, str]:
    """The driver's storage credentials and endpoint, for Ray's runtime_env: workers started by a cluster do not
    inherit the driver's environment. Where nodes have their own (instance profiles), none are set here."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}

