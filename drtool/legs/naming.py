"""How drtool names what it makes in a store that has no user properties (RBD and
CephFS snapshots, object-store prefixes): ``drtool-<policy>-<leg>-<UTC time>``. A leg
lists, prunes and replicates only names with its own prefix; the time is read back
from the name."""
from __future__ import annotations

from datetime import datetime, timezone

TIME_FORMAT = "%Y%m%dT%H%M%SZ"  # one-second resolution, sorts as it reads


def stamp(when: datetime) -> str:
    return f"{when.astimezone(timezone.utc):{TIME_FORMAT}}"


def snap_prefix(policy: str, leg: str) -> str:
    return f"drtool-{policy}-{leg}-"


def owned_name(policy: str, leg: str, when: datetime) -> str:
    return snap_prefix(policy, leg) + stamp(when)


def name_time(name: str, prefix: str, fallback: datetime | None) -> datetime:
    """The UTC time in ``name`` after ``prefix``; ``fallback`` (the store's own stamp,
    else the epoch) for a name that does not parse."""
    try:
        return datetime.strptime(name[len(prefix):], TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return fallback or datetime.fromtimestamp(0, timezone.utc)
