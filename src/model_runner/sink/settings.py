"""A sink's settings, in two typed records: what decides its S3 client, and what shapes its objects and writes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Literal

from botocore.config import Config

from model_runner.sink.encoding import CONTENT_TYPES, OUTPUT_FORMATS, OutputFormat

__all__ = ["ClientSettings", "MiB", "SinkSettings"]

MiB = 1024 * 1024

#: What time it is, as an aware datetime.
Clock = Callable[[], datetime]
# S3's multipart limits: every part but the last is at least 5 MiB, no part exceeds 5 GiB.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB

ServerSideEncryption = Literal["AES256", "aws:kms", "aws:kms:dsse"]
RetryMode = Literal["standard", "adaptive", "legacy"]


@dataclass(frozen=True)
class ClientSettings:
    """
    What decides a sink's S3 client: where it connects, as whom, and what the writes through it share.

    Sinks of one event loop with equal client settings (and the same ``assumed_role`` and ``session``)
    share one client, with its connection pool, its byte budget and its worker threads, whatever their
    :class:`SinkSettings`.

    :param endpoint_url: S3 endpoint, or `None` for the standard configuration (``AWS_ENDPOINT_URL_S3``...).
    :param sts_endpoint_url: STS endpoint for ``assumed_role``, or `None` for the standard configuration.
    :param region_name: Region, or `None` for the session's, then ``AWS_REGION``, the standard configuration and
        us-east-1.
    :param client_config: A botocore config merged over the sink's own.
    :param max_pool_connections: HTTP connections the client keeps open.
    :param max_attempts: Attempts per request, or `None` for ``AWS_MAX_ATTEMPTS`` or botocore's default.
    :param retry_mode: botocore retry mode, or `None` for ``AWS_RETRY_MODE``, else `"standard"`.
    :param max_bytes_in_flight: Bytes of request bodies held at once by all the writes through the client: with
        the part size, what bounds memory under load.
    :param max_worker_threads: Worker threads encoding and sealing bodies at once for the writes through the
        client. orjson holds the GIL, so more threads only make the event loop wait longer for it.
    :param role_session_name: Session name of assumed roles.
    :param role_duration_seconds: Lifetime of assumed-role credentials, 900 to 43,200 seconds.
    :param credential_refresh_seconds: Assumed-role credentials are refreshed when fewer than this many seconds
        of their life remain, at most half of it; `None` (the default) for the lesser of 600 s and a quarter of
        ``role_duration_seconds``. The first write to come refreshes them up to 300 s (at most a quarter of their
        life) earlier, while the others carry on.
    :param clock: What time it is (an aware datetime), for credential expiry; `None` for the system clock. For
        tests and simulations.
    """

    endpoint_url: str | None = None
    sts_endpoint_url: str | None = None
    region_name: str | None = None
    # botocore's Config is not hashable, nor comparable: its options stand in for it (client_config_key).
    client_config: Config | None = field(default=None, compare=False)
    max_pool_connections: int = 32
    max_attempts: int | None = None
    retry_mode: RetryMode | None = None
    max_bytes_in_flight: int = 256 * MiB
    max_worker_threads: int = 2
    role_session_name: str = "model-runner-sink"
    role_duration_seconds: int = 3600
    credential_refresh_seconds: int | None = None
    clock: Clock | None = None
    client_config_key: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_pool_connections", "max_bytes_in_flight", "max_worker_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 900 <= self.role_duration_seconds <= 43200:
            raise ValueError("role_duration_seconds must be between 900 and 43200")
        refresh = self.credential_refresh_seconds
        # Beyond half their life, the earlier advisory window would cover most or all of it: AssumeRole on every write.
        if refresh is not None and not 0 <= 2 * refresh <= self.role_duration_seconds:
            raise ValueError(
                f"credential_refresh_seconds must be between 0 and half of role_duration_seconds "
                f"({self.role_duration_seconds // 2}), not {refresh}"
            )
        if self.client_config is not None:
            object.__setattr__(self, "client_config_key", repr(vars(self.client_config)))

    def merged(self, source: str, values: Mapping[str, Any]) -> ClientSettings:
        """
        These settings with values given elsewhere (a deprecated keyword), which must not contradict them.

        :param source: Where the values were given, for the error.
        :param values: Field names and values; `None` values count as not given.
        :return: The merged settings.
        :raises TypeError: If a value is also set here, to another value.
        """
        given = {name: value for name, value in values.items() if value is not None}
        for name, value in given.items():
            mine = getattr(self, name)
            if mine != _CLIENT_DEFAULTS[name] and mine is not value and mine != value:
                raise TypeError(f"{name} given both in {source} ({value!r}) and in ClientSettings ({mine!r})")
        return replace(self, **given) if given else self


_CLIENT_DEFAULTS = {item.name: item.default for item in fields(ClientSettings) if item.init}

# SinkSettings' fields that moved to ClientSettings: still accepted there, with a DeprecationWarning.
MOVED_TO_CLIENT = (
    "max_bytes_in_flight",
    "max_pool_connections",
    "max_worker_threads",
    "max_attempts",
    "retry_mode",
    "role_session_name",
    "role_duration_seconds",
    "credential_refresh_seconds",
)


@dataclass(frozen=True)
class SinkSettings:
    """
    How a sink encodes and uploads each write, and the options of the objects it writes.

    None of these decides the S3 client: sinks that differ only here share one (see :class:`ClientSettings`). The
    defaults suit both a service writing many small collections and a backfill writing huge ones.

    :param part_size: Size of a multipart part in bytes (at least 5 MiB); grown automatically for objects so
        large that they would otherwise need more than 10,000 parts.
    :param multipart_threshold: A collection whose encoding reaches this many bytes is uploaded in parts.
    :param max_parts_in_flight: Parts of one write uploading at once.
    :param encode_batch_features: Features in the first batch given to orjson; later batches adapt.
    :param encode_call_seconds: Target duration of one batch's orjson call (with its pulling, for an iterable
        pulled off the loop). orjson holds the GIL for a whole call, so this bounds how long the event loop can
        wait on the encoder.
    :param acl: Canned ACL of written objects, or `None` for the bucket's default.
    :param content_type: Content type of written objects; `None` (the default) for the format's own,
        ``application/geo+json`` or ``application/geo+json-seq``.
    :param output_format: `"geojson"` (the default): one FeatureCollection at ``<prefix>/<name>.geojson``;
        `"geojsonseq"`: a GeoJSON text sequence, one feature a line, at ``<prefix>/<name>.geojsonl``.
    :param storage_class: S3 storage class, or `None` for the bucket's default.
    :param server_side_encryption: `"AES256"` (SSE-S3), `"aws:kms"` or `"aws:kms:dsse"`, or `None`.
    :param sse_kms_key_id: KMS key for `"aws:kms"` encryption.
    :param expected_bucket_owner: Account id every request requires the bucket to belong to.
    :param max_bytes_in_flight: Deprecated: :attr:`ClientSettings.max_bytes_in_flight`.
    :param max_pool_connections: Deprecated: :attr:`ClientSettings.max_pool_connections`.
    :param max_worker_threads: Deprecated: :attr:`ClientSettings.max_worker_threads`.
    :param max_attempts: Deprecated: :attr:`ClientSettings.max_attempts`.
    :param retry_mode: Deprecated: :attr:`ClientSettings.retry_mode`.
    :param role_session_name: Deprecated: :attr:`ClientSettings.role_session_name`.
    :param role_duration_seconds: Deprecated: :attr:`ClientSettings.role_duration_seconds`.
    :param credential_refresh_seconds: Deprecated: :attr:`ClientSettings.credential_refresh_seconds`.
    """

    part_size: int = 8 * MiB
    multipart_threshold: int = 8 * MiB
    max_parts_in_flight: int = 6
    encode_batch_features: int = 1000
    encode_call_seconds: float = 0.001
    acl: str | None = "bucket-owner-full-control"
    content_type: str | None = None
    output_format: OutputFormat = "geojson"
    storage_class: str | None = None
    server_side_encryption: ServerSideEncryption | None = None
    sse_kms_key_id: str | None = None
    expected_bucket_owner: str | None = None
    # Moved to ClientSettings; `None` when not given. Kept last, so that new fields go above them.
    max_bytes_in_flight: int | None = None
    max_pool_connections: int | None = None
    max_worker_threads: int | None = None
    max_attempts: int | None = None
    retry_mode: RetryMode | None = None
    role_session_name: str | None = None
    role_duration_seconds: int | None = None
    credential_refresh_seconds: int | None = None

    def __post_init__(self) -> None:
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between 5 MiB and 5 GiB, not {self.part_size}")
        if self.multipart_threshold < 1:
            raise ValueError("multipart_threshold must be positive")
        for name in ("max_parts_in_flight", "encode_batch_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.output_format not in OUTPUT_FORMATS:
            accepted = ", ".join(map(repr, OUTPUT_FORMATS))
            raise ValueError(f"output_format must be one of {accepted}, not {self.output_format!r}")
        if self.encode_call_seconds <= 0:
            raise ValueError("encode_call_seconds must be positive")
        if self.sse_kms_key_id is not None and self.server_side_encryption not in ("aws:kms", "aws:kms:dsse"):
            raise ValueError("sse_kms_key_id needs server_side_encryption='aws:kms' or 'aws:kms:dsse'")
        moved = self.moved_client_settings()
        if moved:
            # Checked now, as before they moved: a bad value fails where it is written.
            ClientSettings().merged("SinkSettings", moved)
            warnings.warn(
                f"SinkSettings({', '.join(moved)}=...) is deprecated: they decide the S3 client, so they moved to "
                f"ClientSettings; pass client=ClientSettings({', '.join(moved)}=...) to the sink",
                DeprecationWarning,
                stacklevel=3,
            )

    def moved_client_settings(self) -> dict[str, Any]:
        """
        The deprecated client fields given to these settings, for the sink to fold into its
        :class:`ClientSettings`.

        :return: Field names and values, of those given.
        """
        return {name: getattr(self, name) for name in MOVED_TO_CLIENT if getattr(self, name) is not None}

    @property
    def effective_content_type(self) -> str:
        """
        The content type written objects get.

        :return: ``content_type`` if set, else the output format's own.
        """
        return self.content_type if self.content_type is not None else CONTENT_TYPES[self.output_format]

    def object_arguments(self) -> dict[str, str]:
        """
        The arguments that ``PutObject`` and ``CreateMultipartUpload`` share.

        :return: Request arguments for the options that are set.
        """
        arguments = {"ContentType": self.effective_content_type}
        optional = {
            "ACL": self.acl,
            "StorageClass": self.storage_class,
            "ServerSideEncryption": self.server_side_encryption,
            "SSEKMSKeyId": self.sse_kms_key_id,
        }
        arguments.update({name: value for name, value in optional.items() if value is not None})
        arguments.update(self.bucket_arguments())
        return arguments

    def bucket_arguments(self) -> dict[str, Any]:
        """
        The arguments every request on the bucket carries.

        :return: ``ExpectedBucketOwner`` when set, else nothing.
        """
        if self.expected_bucket_owner is None:
            return {}
        return {"ExpectedBucketOwner": self.expected_bucket_owner}


# The sinks' keywords that moved to ClientSettings: still accepted, with a DeprecationWarning.
CLIENT_KEYWORDS = ("endpoint_url", "sts_endpoint_url", "region_name", "client_config", "clock")


def resolve_client_settings(
    client: ClientSettings | None, settings: SinkSettings, keywords: Mapping[str, Any], *, stacklevel: int
) -> ClientSettings:
    """
    A sink's client settings: ``client``, with the deprecated keywords and :class:`SinkSettings` fields folded in.

    :param client: The ``client=`` given to the sink, if any.
    :param settings: The sink's settings, which may hold deprecated client fields.
    :param keywords: The other keywords given to the sink: only :data:`CLIENT_KEYWORDS` are accepted.
    :param stacklevel: The caller's frame, for the warning, counted as ``warnings.warn`` does from here.
    :return: The client settings.
    :raises TypeError: If a keyword is unknown, or a value is given both ways.
    """
    unknown = sorted(set(keywords) - set(CLIENT_KEYWORDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    if client is not None and not isinstance(client, ClientSettings):
        raise TypeError(f"client must be a ClientSettings, not {type(client).__name__}")
    resolved = client or ClientSettings()
    given = {name: value for name, value in keywords.items() if value is not None}
    if given:
        both = [name for name in given if getattr(resolved, name) is not None]
        if both:
            raise TypeError(f"{both[0]} given both as a keyword and in client=ClientSettings(...)")
        names = ", ".join(given)
        warnings.warn(
            f"the sink's {names} keyword(s) are deprecated: pass client=ClientSettings({names}=...)",
            DeprecationWarning,
            stacklevel=stacklevel + 1,
        )
        resolved = replace(resolved, **given)
    return resolved.merged("SinkSettings", settings.moved_client_settings())
