"""Policy file models: the one source of truth for validation, JSON Schema,
the commented sample and the reference docs (STYLE #1).

Every field has a type, a description and (where useful) an example; unknown
keys are errors. Cross-references (a leg's target location, a source location)
are checked in ``loader.py``, which knows file:line.
"""
from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal, Union

from ..cron import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..durations import DURATION_PATTERN, parse_duration
from ..secrets import SecretRef

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME_HINT = "use lowercase letters, digits, '.', '_' or '-' (start with a letter or digit, at most 63 characters)"

Duration = Annotated[str, Field(pattern=DURATION_PATTERN, json_schema_extra={"format": "duration"})]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    # defer_build: a model's validator is built when it is first used, not when its class
    # is defined. Built eagerly, every one of the ~45 policy and drill models compiled its
    # own validator at import and the file's top model then compiled them all again:
    # 0.12 s of a 0.5 s start-up here, on every command.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, defer_build=True)


# --------------------------------------------------------------------------- locations

Media = Annotated[
    str,
    Field(
        description="Storage medium, for the '2 media' rule: ssd, nvme, hdd, tape, optical, cloud-object, … "
        "Two copies on the same medium count once.",
        examples=["hdd"],
        min_length=1,
    ),
]


class LocationBase(Strict):
    media: Media
    site: str = Field(
        description="Physical site, for the '1 offsite' rule. A copy counts as offsite when its site differs from the source's.",
        examples=["home"],
        min_length=1,
    )
    failure_domain: str = Field(
        description="What fails together (a host, a pool, a cluster, a cloud account). "
        "Copies in the same failure domain as the source, or as each other, count once.",
        examples=["nas01"],
        min_length=1,
    )
    immutable: bool = Field(
        False,
        description="Copies here cannot be altered or deleted before they expire (object lock, bucket retention, append-only). "
        "Where drtool can read the fact from the store it checks the claim; elsewhere it is reported as declared.",
    )
    offline: bool = Field(
        False,
        description="An offline or air-gapped medium (a rotated USB disk, tape). Counts for the '1 immutable or offline' rule; reported as declared.",
    )

    sample_name: ClassVar[str] = "location"


class FilesystemLocation(LocationBase):
    """Plain files on a host: where a policy's source lives."""

    type: Literal["filesystem"] = Field(description="Location type.")
    host: str | None = Field(None, description="Host name, for reports. Defaults to this machine.", examples=["nas01"])

    sample_name: ClassVar[str] = "nas"


class ResticLocation(LocationBase):
    """A restic repository: a local path, or a URL restic understands (sftp:, s3:, gs:, rest:)."""

    type: Literal["restic"] = Field(description="Location type.")
    repository: str = Field(
        description="The restic repository: an absolute path, or a restic URL such as sftp:host:/path, s3:https://host/bucket, gs:bucket:/path.",
        examples=["/srv/backup/restic"],
        min_length=1,
    )
    password: SecretRef = Field(description="The repository password, as a secret reference. Passed to restic by file descriptor, never in argv.")
    init: bool = Field(False, description="Initialise the repository on first use when it does not exist yet.")
    env: dict[str, SecretRef] = Field(
        default_factory=dict,
        description="Extra environment for restic (e.g. AWS_ACCESS_KEY_ID), each value a secret reference.",
    )

    sample_name: ClassVar[str] = "offsite-restic"

    @field_validator("repository")
    @classmethod
    def _absolute_or_url(cls, v: str) -> str:
        if ":" not in v and not v.startswith("/"):
            raise ValueError(f"repository {v!r} is a relative path: use an absolute path or a restic URL (sftp:, s3:, gs:, rest:)")
        return v


class ZfsLocation(LocationBase):
    """A ZFS pool or dataset tree, on this host or reached over ssh."""

    type: Literal["zfs"] = Field(description="Location type.")
    dataset: str = Field(
        description="The pool or dataset under which sources live (a snapshot leg's source) or replicas are received (a replicate leg's target).",
        examples=["tank"],
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$",
    )
    ssh: str | None = Field(None, description="Run zfs on this host over ssh (user@host, key-based, BatchMode).", examples=["root@nas01.lab"])
    ssh_options: list[str] = Field(
        default_factory=list,
        description="Extra ssh arguments, e.g. a port or an identity file (never a secret: they show in ps).",
        examples=[["-p", "2222", "-i", "/etc/drtool/ssh/id_ed25519"]],
    )

    sample_name: ClassVar[str] = "tank"


class SnapraidLocation(LocationBase):
    """A SnapRAID array of plain data disks, usually pooled by mergerfs. Its parity is
    protection for the files on it, not a copy of them."""

    type: Literal["snapraid"] = Field(description="Location type.")
    config: str = Field(description="Absolute path of the array's snapraid.conf.", examples=["/etc/snapraid.conf"], min_length=2)
    pool: str | None = Field(
        None,
        description="The mergerfs pool's mount point over the data disks. drtool checks that every data disk is mounted and is a branch of it.",
        examples=["/mnt/storage"],
    )

    sample_name: ClassVar[str] = "array"

    @field_validator("config", "pool")
    @classmethod
    def _absolute_path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r} is a relative path: write an absolute path")
        return v


class ObjectLocationBase(LocationBase):
    bucket: str = Field(description="The bucket name.", examples=["lab-offsite"], min_length=3, pattern=r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
    prefix: str = Field("drtool", description="Key prefix under which drtool writes (<prefix>/<policy>/<leg>/<time>/…).", examples=["drtool"])
    endpoint: str | None = Field(None, description="API endpoint, for emulators and S3-compatible stores (http(s)://host:port).",
                                 examples=["http://127.0.0.1:8333"])

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"endpoint {v!r} is not an http(s) URL")
        return v


class GcsLocation(ObjectLocationBase):
    """A Google Cloud Storage bucket. Whether it is immutable is read from the bucket (retention policy, lock)."""

    type: Literal["gcs"] = Field(description="Location type.")
    project: str | None = Field(None, description="The GCP project (for the client; buckets are global).", examples=["my-lab"])
    credentials: SecretRef | None = Field(
        None, description="A service-account key (the JSON), as a secret reference. Absent: Application Default Credentials, "
        "or anonymous access when an emulator endpoint is set.")

    sample_name: ClassVar[str] = "offsite-gcs"


class S3Location(ObjectLocationBase):
    """An S3 or S3-compatible bucket (AWS, MinIO, Ceph RGW, SeaweedFS). Object lock and versioning are read from the bucket."""

    type: Literal["s3"] = Field(description="Location type.")
    region: str | None = Field(None, description="The bucket's region.", examples=["us-east-1"])
    access_key_id: SecretRef | None = Field(None, description="Access key id, as a secret reference. Absent: the AWS SDK's default chain.")
    secret_access_key: SecretRef | None = Field(None, description="Secret access key, as a secret reference.")

    sample_name: ClassVar[str] = "offsite-s3"

    @model_validator(mode="after")
    def _both_keys(self) -> "S3Location":
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither (the SDK's default chain)")
        return self


class CephClusterLocation(LocationBase):
    """How the Ceph tools reach a cluster: its ceph.conf, a cephx client and its keyring.
    Two locations with the same conf are one cluster (one failure domain)."""

    conf: str = Field("/etc/ceph/ceph.conf", description="The cluster's ceph.conf (absolute path).", examples=["/etc/ceph/ceph.conf"])
    keyring: str | SecretRef | None = Field(
        None, description="The client's keyring: a file (absolute path, readable only by drtool's user), or a secret reference to "
        "its content (handed to the Ceph tools as an in-memory file, never on disk). Default: what ceph.conf says.",
        examples=["/etc/ceph/ceph.client.drtool.keyring", {"vault": "secret/ceph/drtool#keyring"}])
    client_id: str = Field("admin", description="The cephx client id (the tools' --id; to snapshot a CephFS path its mds caps "
                           "need the 's' flag).", examples=["drtool"])

    @field_validator("conf", "keyring")
    @classmethod
    def _abs(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.startswith("/"):
            raise ValueError(f"{v!r} is a relative path: write an absolute path")
        return v


class CephRbdLocation(CephClusterLocation):
    """A Ceph RBD pool: where a source image lives (snapshot legs), or where replicas are imported (replicate legs)."""

    type: Literal["ceph-rbd"] = Field(description="Location type.")
    pool: str = Field(description="The RBD pool.", examples=["kube"], min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    sample_name: ClassVar[str] = "ceph-rbd"


class CephFsLocation(CephClusterLocation):
    """A CephFS tree: a directory of the file system (``path``) or a subvolume (``subvolume``,
    optionally in a ``group``). Snapshot legs snapshot it in place; backup legs back up a
    snapshot of it with restic (point-in-time consistent)."""

    type: Literal["cephfs"] = Field(description="Location type.")
    fs: str = Field("cephfs", description="The CephFS file system's name.", examples=["cephfs"],
                    pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str | None = Field(None, description="The directory to protect, from the file system's root (default: the root). "
                             "Not with 'subvolume'.", examples=["/shares/photos"])
    subvolume: str | None = Field(None, description="A subvolume (mgr volumes module) to protect instead of a path: its "
                                  "snapshots are made with 'ceph fs subvolume snapshot create'.", examples=["csi-vol-9c1e"],
                                  pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    group: str | None = Field(None, description="The subvolume's group (default: the ungrouped '_nogroup').", examples=["csi"],
                              pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    sample_name: ClassVar[str] = "cephfs"

    @field_validator("path")
    @classmethod
    def _fs_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = [p for p in v.split("/") if p]
        if not v.startswith("/"):
            raise ValueError(f"path {v!r} is relative: write it from the file system's root, e.g. /shares/photos")
        if any(p in ("..", ".", ".snap") for p in parts):
            raise ValueError(f"path {v!r} contains '.', '..' or '.snap': name the directory itself")
        return "/" + "/".join(parts)

    @model_validator(mode="after")
    def _one_tree(self) -> "CephFsLocation":
        if self.subvolume is not None and self.path is not None:
            raise ValueError("give 'path' (a directory) or 'subvolume' (with its 'group'), not both")
        if self.group is not None and self.subvolume is None:
            raise ValueError("'group' names a subvolume's group: give 'subvolume' too")
        return self

    @property
    def tree(self) -> str:
        """What is protected, for messages."""
        if self.subvolume is not None:
            return f"subvolume {self.group + '/' if self.group else ''}{self.subvolume} of CephFS {self.fs!r}"
        return f"{self.path or '/'} in CephFS {self.fs!r}"


class AppRole(Strict):
    """Vault AppRole credentials, both as secret references."""

    role_id: SecretRef = Field(description="The AppRole role_id, as a secret reference.")
    secret_id: SecretRef = Field(description="The AppRole secret_id, as a secret reference.")


class VaultLocation(LocationBase):
    """A HashiCorp Vault or OpenBao cluster with integrated (raft) storage: a source whose
    recovery points are raft snapshots. Its unseal keys belong in the break-glass bundle."""

    type: Literal["vault"] = Field(description="Location type.")
    address: str = Field(description="The cluster's API address.", examples=["https://vault.lab:8200"])
    ca_cert: str | None = Field(None, description="CA bundle (absolute path) to verify the server's TLS certificate.",
                                examples=["/etc/drtool/vault-ca.pem"])
    token: SecretRef | None = Field(None, description="A token allowed to read sys/storage/raft/snapshot (and the canaries), as a secret reference.")
    approle: AppRole | None = Field(None, description="AppRole login instead of a token.")
    unseal_keys: list[SecretRef] = Field(
        default_factory=list,
        description="The Shamir unseal key shares, each a secret reference: at least the threshold. They go into the break-glass "
        "bundle, and a sample verify unseals the restored copy with them (from the bundle when one exists). Recovery keys of an "
        "auto-unsealed cluster cannot unseal a scratch server: such a cluster can be verified at integrity level only.",
        examples=[[{"file": "/etc/drtool/vault/unseal-1"}, {"file": "/etc/drtool/vault/unseal-2"}]])
    server_binary: str | None = Field(None, description="The server binary a sample verify starts as a scratch server (default: bao or vault on PATH).",
                                      examples=["bao"])

    sample_name: ClassVar[str] = "vault"

    @field_validator("address")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"address {v!r} is not an http(s) URL, e.g. https://vault.lab:8200")
        return v.rstrip("/")

    @field_validator("ca_cert")
    @classmethod
    def _abs(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r} is a relative path: write an absolute path")
        return v

    @model_validator(mode="after")
    def _auth(self) -> "VaultLocation":
        if (self.token is None) == (self.approle is None):
            raise ValueError("give exactly one of 'token' or 'approle' (how drtool logs in to take snapshots)")
        return self


class EtcdEndpoint(Strict):
    """Direct etcd access with client certificates (etcdctl)."""

    endpoints: list[str] = Field(min_length=1, description="etcd client URLs.", examples=[["https://10.0.0.2:2379"]])
    ca_cert: str | None = Field(None, description="CA certificate (absolute path).", examples=["/etc/drtool/etcd/ca.crt"])
    cert: str | None = Field(None, description="Client certificate (absolute path).", examples=["/etc/drtool/etcd/client.crt"])
    key: str | None = Field(None, description="Client key (absolute path, readable only by drtool's user).", examples=["/etc/drtool/etcd/client.key"])

    @field_validator("ca_cert", "cert", "key")
    @classmethod
    def _abs(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r} is a relative path: write an absolute path")
        return v

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for e in v:
            if not re.match(r"^https?://[^/\s]+", e):
                raise ValueError(f"endpoint {e!r} is not an http(s) URL, e.g. https://10.0.0.2:2379")
        return v


class TalosLocation(LocationBase):
    """A Talos Kubernetes cluster: its etcd (snapshots through talosctl, or etcdctl with
    client certificates) and its machine configuration. Any etcd cluster works through
    'etcd' alone."""

    type: Literal["talos"] = Field(description="Location type.")
    nodes: list[str] = Field(default_factory=list, description="Control-plane node(s) talosctl talks to (the first one answers).",
                             examples=[["10.0.0.2"]])
    talosconfig: SecretRef | None = Field(None, description="The talosconfig (client credentials), as a secret reference. Goes into the break-glass bundle.")
    secrets_bundle: SecretRef | None = Field(None, description="The Talos secrets bundle (talosctl gen secrets), as a secret reference. "
                                             "Goes into the break-glass bundle: a cluster cannot be rebuilt with its identity without it.")
    etcd: EtcdEndpoint | None = Field(None, description="Reach etcd directly with etcdctl: used when talosctl is not installed, or with no nodes.")
    machine_configs: str | None = Field(None, description="A directory of machine config files (e.g. in git) to upload instead of asking the nodes.",
                                        examples=["/srv/git/talos/clusterconfig"])
    talosctl: str = Field("talosctl", description="The talosctl binary.")
    etcdctl: str = Field("etcdctl", description="The etcdctl binary (snapshots without talosctl, and every restore and verify).")
    etcd_binary: str = Field("etcd", description="The etcd binary a verify starts on the restored snapshot.")

    sample_name: ClassVar[str] = "talos"

    @model_validator(mode="after")
    def _reach(self) -> "TalosLocation":
        if not self.nodes and self.etcd is None:
            raise ValueError("give 'nodes' (talosctl) or 'etcd' (etcdctl with client certificates): how drtool reaches etcd")
        if self.nodes and self.talosconfig is None:
            raise ValueError("talosctl needs 'talosconfig' (a secret reference to the client configuration)")
        return self


Location = Annotated[Union[FilesystemLocation, ResticLocation, ZfsLocation, SnapraidLocation, GcsLocation, S3Location,
                           VaultLocation, TalosLocation, CephRbdLocation, CephFsLocation],
                     Field(discriminator="type")]
LOCATION_TYPES: tuple[type[LocationBase], ...] = (FilesystemLocation, ResticLocation, ZfsLocation, SnapraidLocation, GcsLocation,
                                                  S3Location, VaultLocation, TalosLocation, CephRbdLocation, CephFsLocation)


# --------------------------------------------------------------------------- legs


class Retention(Strict):
    """GFS retention (see docs/retention.md). No rule at all means keep everything."""

    keep_last: int | None = Field(None, ge=0, description="Keep the N newest points.", examples=[3])
    keep_hourly: int | None = Field(None, ge=0, description="Keep the newest point of each of the last N hours that have points.", examples=[24])
    keep_daily: int | None = Field(None, ge=0, description="Keep the newest point of each of the last N days that have points.", examples=[7])
    keep_weekly: int | None = Field(None, ge=0, description="Keep the newest point of each of the last N ISO weeks that have points.", examples=[4])
    keep_monthly: int | None = Field(None, ge=0, description="Keep the newest point of each of the last N months that have points.", examples=[12])
    keep_yearly: int | None = Field(None, ge=0, description="Keep the newest point of each of the last N years that have points.", examples=[3])


VerifyLevel = Literal["exists", "integrity", "sample", "full"]
VERIFY_LEVELS: tuple[str, ...] = ("exists", "integrity", "sample", "full")


class Verify(Strict):
    """How deep and how often to prove a copy is restorable."""

    level: VerifyLevel = Field(
        "exists",
        description="exists: a point is listed and fresh within the RPO; integrity: the store's own deep check "
        "(restic check --read-data-subset); sample: restore a random sample of files and compare hashes recorded at "
        "backup time; full: restore everything and compare.",
        examples=["integrity"],
    )
    every: Duration = Field("1d", description="How often this verification must pass for the copy to count as error-free.", examples=["7d"])
    read_data_percent: float = Field(
        5.0, gt=0, le=100, description="integrity: the share of pack data restic reads back and checks.", examples=[10]
    )
    sample_files: int = Field(
        16, ge=1, le=10000, description="sample: how many files are hashed at backup time and restored and compared at verify time.", examples=[32]
    )
    manifest: Literal["sample", "full"] = Field(
        "sample", description="backup legs: at backup time hash a sample of the files (sample_files), or every file (full: a `full` "
        "verify and a drill's full tree-compare then check every file; costs one more read of the source, beside restic).",
        examples=["full"])

    @property
    def every_td(self) -> timedelta:
        return parse_duration(self.every)


class ParityPlan(Strict):
    """parity legs: when to refuse a sync, and how much to scrub after it. A threshold
    is crossed when the count OR the percentage (of the files parity covered) is exceeded;
    null switches that one off."""

    max_removed: int | None = Field(50, ge=0, description="Refuse to sync when more files than this were removed since the last sync.", examples=[50])
    max_removed_percent: float | None = Field(
        5.0, ge=0, le=100, description="Refuse to sync when more than this share of the files was removed.", examples=[5])
    max_updated: int | None = Field(500, ge=0, description="Refuse to sync when more files than this were changed in place.", examples=[500])
    max_updated_percent: float | None = Field(
        20.0, ge=0, le=100, description="Refuse to sync when more than this share of the files was changed in place (ransomware encrypts in place).",
        examples=[20])
    threshold_ignore: list[str] = Field(
        default_factory=list,
        description="Glob patterns (on paths relative to a disk, e.g. 'backups/rolling/*') whose removals and updates do not count "
        "against the thresholds: expected churn, such as a rolling backup folder, then never blocks the sync.",
        examples=[["backups/rolling/*"]],
    )
    scrub_percent: float = Field(8.0, ge=0, le=100, description="After each sync, scrub this share of the array, oldest blocks first (0: no scrub).",
                                 examples=[8])
    scrub_older_than_days: int = Field(10, ge=0, description="Scrub only blocks not scrubbed for this many days.", examples=[10])


class UploadSpec(Strict):
    """upload legs: what to stream. Default: the policy's source path (a file as is, a directory as a tar stream)."""

    command: list[str] | None = Field(
        None, description="Stream this command's stdout instead of the source path (an etcd or Vault snapshot, a database dump). "
        "argv, never a shell; secrets by environment, not in argv.", examples=[["etcdctl", "snapshot", "save", "/dev/stdout"]], min_length=1)
    name: str | None = Field(None, description="Object name under the point's prefix. Default: the source's base name (plus .tar for a "
                             "directory), or 'stream' for a command.", examples=["etcd.db"], pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    content: Literal["etcd", "machineconfig"] | None = Field(
        None, description="talos sources: what to upload: the etcd snapshot (default) or the machine configuration.", examples=["etcd"])
    part_size_mb: int | None = Field(None, ge=5, le=512, description="Multipart part size (S3); for GCS, the bytes kept to resume a broken "
                                     "streaming upload (and below which an upload is one plain request), in MiB. "
                                     "Default: 8 for S3 (4 parts in flight: ~40 MiB of buffers), 16 for GCS.",
                                     examples=[16])


LegKind = Literal["snapshot", "replicate", "backup", "upload", "parity"]
LEG_KINDS: tuple[str, ...] = ("snapshot", "replicate", "backup", "upload", "parity")
class Leg(Strict):
    """One way a policy protects its source."""

    kind: LegKind = Field(
        description="snapshot: point-in-time on the source's own storage (a recovery point, not a copy); "
        "replicate: to another location of the same kind; backup: restic into a repository; "
        "upload: a stream or file to an object store; parity: SnapRAID sync/scrub (protection, not a copy).",
        examples=["backup"],
    )
    name: Name | None = Field(None, description="Leg name, unique in the policy. Default: the kind and target, e.g. 'backup-offsite-restic'.", examples=["nightly"])
    to: Name | None = Field(None, description="The target location's name (all kinds except snapshot and parity).", examples=["offsite-restic"])
    schedule: str = Field(description="When to run, as a cron expression (5 fields, or @hourly/@daily/@weekly).", examples=["0 3 * * *"])
    retention: Retention = Field(default_factory=Retention, description="What prune keeps. Empty: keep everything.")
    verify: Verify = Field(default_factory=Verify, description="Verification level and frequency.")
    exclude: list[str] = Field(default_factory=list, description="backup: restic exclude patterns.", examples=[["*.tmp", ".cache"]])
    dataset: str | None = Field(
        None,
        description="replicate: the replica dataset (zfs; default: the target location's dataset plus the source dataset's last component) or image (ceph-rbd; default: the source image's name).",
        examples=["backup/documents"],
    )

    parity: ParityPlan | None = Field(None, description="parity: thresholds that stop a sync, and the scrub plan. Default: the ParityPlan defaults.")
    upload: UploadSpec | None = Field(None, description="upload: what to stream (default: the source path).")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a valid cron expression: write 5 fields 'minute hour day month weekday', e.g. '0 3 * * *'")
        return v

    @model_validator(mode="after")
    def _target(self) -> "Leg":
        if self.kind in ("snapshot", "parity"):
            if self.to is not None:
                raise ValueError(f"a {self.kind} leg acts on the source's own location: remove 'to'")
        elif self.to is None:
            raise ValueError(f"a {self.kind} leg needs 'to': the name of the target location")
        if self.parity is not None and self.kind != "parity":
            raise ValueError(f"'parity' settings belong to parity legs: remove them from this {self.kind} leg")
        if self.upload is not None and self.kind != "upload":
            raise ValueError(f"'upload' settings belong to upload legs: remove them from this {self.kind} leg")
        if self.kind == "parity" and self.retention.model_dump(exclude_none=True):
            raise ValueError("a parity leg keeps no history (SnapRAID holds one parity state): remove 'retention'")
        return self

    @property
    def parity_plan(self) -> "ParityPlan":
        return self.parity or ParityPlan()

    @property
    def leg_name(self) -> str:
        if self.name:
            return self.name
        return f"{self.kind}-{self.to}" if self.to else self.kind


class Source(Strict):
    """What a policy protects, and where it lives."""

    location: Name = Field(description="The location holding the source (its media/site/failure_domain are the production copy's).", examples=["nas"])
    path: str | list[str] | None = Field(
        None,
        description="Absolute path(s) of the data to protect (filesystem sources).",
        examples=["/srv/data/documents"],
    )
    dataset: str | None = Field(None, description="The ZFS dataset to protect (zfs sources).", examples=["tank/documents"])
    image: str | None = Field(None, description="The RBD image to protect (ceph-rbd sources).", examples=["csi-vol-3f2a"],
                              pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    recursive: bool = Field(False, description="zfs sources: snapshot and replicate the dataset's children too.")
    canaries: list[str] = Field(
        default_factory=list,
        description="vault sources: secrets (mount/path#key) a sample verify must read back from the restored snapshot. "
        "Their KV versions are recorded at backup time and must be present in the restore.",
        examples=[["secret/drtool/canary#value"]])

    @field_validator("canaries")
    @classmethod
    def _refs(cls, v: list[str]) -> list[str]:
        for ref in v:
            if not re.fullmatch(r"[^#\s]+/[^#\s]+#[^#\s]+", ref):
                raise ValueError(f"canary {ref!r} is not mount/path#key, e.g. secret/drtool/canary#value")
        return v

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str | list[str] | None) -> str | list[str] | None:
        paths = [v] if isinstance(v, str) else (v or [])
        if isinstance(v, list) and not v:
            raise ValueError("path is an empty list: name at least one absolute path")
        for p in paths:
            if not p.startswith("/"):
                raise ValueError(f"path {p!r} is relative: write an absolute path (restic stores relative paths oddly)")
        return v

    @property
    def paths(self) -> list[str]:
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)


class Policy(Strict):
    """Protects one source with a set of legs, against declared RPO and RTO."""

    name: Name = Field(description="Policy name, unique across the configuration.", examples=["documents"])
    description: str | None = Field(None, description="Free text for reports.", examples=["Family documents and scans"])
    source: Source = Field(description="What to protect.")
    rpo: Duration = Field(description="Recovery point objective: the newest point of each counted copy must be younger than this.", examples=["24h"])
    rto: Duration = Field(description="Recovery time objective: drills measure restores against it.", examples=["4h"])
    legs: list[Leg] = Field(min_length=1, description="How the source is protected.")

    @model_validator(mode="after")
    def _unique_legs(self) -> "Policy":
        seen: set[str] = set()
        for leg in self.legs:
            if leg.leg_name in seen:
                raise ValueError(f"two legs are named {leg.leg_name!r}: give one of them a distinct 'name'")
            seen.add(leg.leg_name)
        return self

    @property
    def rpo_td(self) -> timedelta:
        return parse_duration(self.rpo)

    @property
    def rto_td(self) -> timedelta:
        return parse_duration(self.rto)

    def leg(self, name: str) -> Leg:
        for leg in self.legs:
            if leg.leg_name == name:
                return leg
        raise KeyError(name)


class BreakGlass(Strict):
    """The break-glass bundle: everything a restore needs that must not live only inside
    Vault or the cluster, age-encrypted and written to every offsite object store."""

    recipients: list[str] = Field(min_length=1, description="age recipients (public keys, age1…) the bundle is encrypted to.",
                                  examples=[["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]])
    identity: SecretRef | None = Field(None, description="The offline age identity (AGE-SECRET-KEY-1…), as a secret reference: "
                                       "`drtool breakglass verify` decrypts with it. Keep it off the machines it protects.")
    to: list[Name] = Field(default_factory=list, description="Object-store locations to write the bundle to. Default: every gcs and s3 location.",
                           examples=[["offsite-gcs"]])
    include: dict[Name, SecretRef] = Field(default_factory=dict, description="Extra items (name: secret reference), e.g. a password manager's recovery kit.")

    @field_validator("recipients")
    @classmethod
    def _age(cls, v: list[str]) -> list[str]:
        for r in v:
            if not (r.startswith("age1") or r.startswith("ssh-")):
                raise ValueError(f"recipient {r[:20]!r}… is not an age public key (age1…) or an ssh public key")
        return v


class PolicyFile(Strict):
    """One drtool policy file. A configuration is one file or a directory of them; names are global across files."""

    model_config = ConfigDict(extra="forbid", title="drtool policy file")

    version: Literal[1] = Field(1, description="Policy file format version.")
    locations: dict[Name, Location] = Field(default_factory=dict, description="Named places where data lives, referenced by name.")
    policies: list[Policy] = Field(default_factory=list, description="What to protect and how.")
    breakglass: BreakGlass | None = Field(None, description="The break-glass bundle (at most one across the configuration's files).")


def valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None
