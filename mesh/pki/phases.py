"""The phases of a CA rotation in `<state_dir>/ca/`: `rotation.json` says which, `next/` holds the new material
beside the current one, `archive/<time>/` keeps the old material once the rotation is finished.

    idle   --start-->  start  (bundles: current + next roots; current intermediates sign)
    start  --switch--> switch (bundles: both roots; the next intermediates sign, every leaf re-issued)
    switch --finish--> idle   (next moved into place, the old material archived; bundles: the new root only)

It owns the files and the order of phases; whether the hosts reached a phase is mesh/ca_rotation.py's. It must
not print or log a key.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from typing import Literal, cast

import structlog

from mesh.errors import MeshError, UsageError
from mesh.pki.byo import GivenCA
from mesh.pki.files import PRIVATE_DIR, PUBLIC_FILE, read_file, sync_dir, write_atomic
from mesh.pki.material import MATERIAL_FILES, write_given, write_own

Phase = Literal["idle", "start", "switch"]
Step = Literal["start", "switch", "finish"]
ROTATION_FILE = "rotation.json"
NEXT_FOLDER = "next"
ARCHIVE_FOLDER = "archive"
BEFORE: dict[Step, Phase] = {"start": "idle", "switch": "start", "finish": "switch"}
AFTER: dict[Step, Phase] = {"start": "start", "switch": "switch", "finish": "idle"}
NEXT_STEP: dict[Phase, Step] = {"idle": "start", "start": "switch", "switch": "finish"}


class OutOfOrder(UsageError):
    """A rotation step run in the wrong phase (exit 5): nothing was changed."""


def read_phase(ca_dir: str) -> Phase:
    """The recorded phase; `idle` when no rotation is under way. A rotation whose `finish` was interrupted is
    a MeshError naming the way out (run it again)."""
    record = read_record(ca_dir)
    if record is None:
        return "idle"
    phase = record.get("phase")
    if phase == "finishing":
        raise MeshError(f"a `mesh ca rotate finish` was interrupted in {ca_dir}",
                        "run `mesh ca rotate finish INVENTORY` again: it completes the move")
    if phase not in ("start", "switch"):
        raise MeshError(f"the mesh CA in {ca_dir} is corrupt: {os.path.join(ca_dir, ROTATION_FILE)} names "
                        f"phase {phase!r}")
    return cast(Phase, phase)


def read_record(ca_dir: str) -> dict[str, str] | None:
    path = os.path.join(ca_dir, ROTATION_FILE)
    if not os.path.lexists(path):
        return None
    try:
        record = json.loads(read_file(path, "the rotation record"))
    except ValueError:
        raise MeshError(f"the mesh CA in {ca_dir} is corrupt: {path} is not JSON") from None
    if not isinstance(record, dict):
        raise MeshError(f"the mesh CA in {ca_dir} is corrupt: {path} is not a JSON object")
    return record


def _write_record(ca_dir: str, record: dict[str, str]) -> None:
    write_atomic(os.path.join(ca_dir, ROTATION_FILE), json.dumps(record, indent=2).encode() + b"\n", PUBLIC_FILE)


def require_order(phase: Phase, step: Step) -> None:
    """OutOfOrder unless `step` is the one that follows `phase`."""
    if BEFORE[step] == phase:
        return
    wanted = NEXT_STEP[phase]
    where = "no rotation is under way" if phase == "idle" else f"the rotation is at phase `{phase}`"
    raise OutOfOrder(f"refusing `mesh ca rotate {step}`: {where}; the next step is `mesh ca rotate {wanted}`",
                     "the phases run in order: start, switch, finish; `mesh ca status` shows where the fleet is")


def begin(ca_dir: str, trust_domain: str, given: GivenCA | None, now: datetime | None = None) -> None:
    """`start`: the next material (mesh's own new root and intermediates, or the owner's `given` intermediate
    with a controllers' intermediate under it) in `next/`, made in a private temp folder and renamed into place;
    then the phase."""
    now = now or datetime.now(UTC)
    require_order(read_phase(ca_dir), "start")
    target = os.path.join(ca_dir, NEXT_FOLDER)
    if os.path.lexists(target):  # left by a start that stopped before its record: made again
        shutil.rmtree(target)
    building = tempfile.mkdtemp(prefix=".next-", dir=ca_dir)
    try:
        os.chmod(building, PRIVATE_DIR)
        if given is None:
            write_own(building, trust_domain, now, with_controllers=True)
        else:
            write_given(building, trust_domain, given, now, with_controllers=True)
        os.rename(building, target)
    finally:
        if os.path.lexists(building):
            shutil.rmtree(building)
    sync_dir(ca_dir)
    _write_record(ca_dir, {"phase": "start", "started": now.isoformat()})
    structlog.get_logger().info("ca_rotation_started", ca_dir=ca_dir, brought=given is not None)


def switch(ca_dir: str, now: datetime | None = None) -> None:
    """`switch`: the next intermediates sign from now on."""
    now = now or datetime.now(UTC)
    require_order(read_phase(ca_dir), "switch")
    record = read_record(ca_dir) or {}
    _write_record(ca_dir, {**record, "phase": "switch", "switched": now.isoformat()})
    structlog.get_logger().info("ca_rotation_switched", ca_dir=ca_dir)


def finish(ca_dir: str, now: datetime | None = None) -> str:
    """`finish`: the current material moved to `archive/<time>/` (0700, keys kept 0600), `next/` moved into its
    place, the record removed. Each move is done once, so a finish interrupted halfway completes when run again.
    Returns the archive folder."""
    now = now or datetime.now(UTC)
    record = read_record(ca_dir) or {}
    if record.get("phase") != "finishing":
        require_order(read_phase(ca_dir), "finish")
        record = {**record, "phase": "finishing",
                  "archive": os.path.join(ARCHIVE_FOLDER, now.strftime("%Y%m%dT%H%M%SZ"))}
        _write_record(ca_dir, record)
    archive = os.path.join(ca_dir, record["archive"])
    os.makedirs(os.path.dirname(archive), mode=PRIVATE_DIR, exist_ok=True)
    os.makedirs(archive, mode=PRIVATE_DIR, exist_ok=True)
    os.chmod(os.path.dirname(archive), PRIVATE_DIR)
    os.chmod(archive, PRIVATE_DIR)
    upcoming = os.path.join(ca_dir, NEXT_FOLDER)
    for name in MATERIAL_FILES:
        current, new = os.path.join(ca_dir, name), os.path.join(upcoming, name)
        if os.path.lexists(current) and (os.path.lexists(new) or not os.path.lexists(os.path.join(archive, name))):
            os.replace(current, os.path.join(archive, name))
        if os.path.lexists(new):
            os.replace(new, current)
    sync_dir(archive)
    sync_dir(ca_dir)
    if os.path.isdir(upcoming):
        shutil.rmtree(upcoming)
    os.unlink(os.path.join(ca_dir, ROTATION_FILE))
    sync_dir(ca_dir)
    structlog.get_logger().info("ca_rotation_finished", ca_dir=ca_dir, archive=archive)
    return archive


def archived_folders(ca_dir: str) -> list[str]:
    """The archive folders of finished rotations, oldest first."""
    folder = os.path.join(ca_dir, ARCHIVE_FOLDER)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if os.path.isdir(os.path.join(folder, name))]
