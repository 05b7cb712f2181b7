"""`mesh_delivery`: how a host's proxies get their config, `files` (pushed over SSH, the default) or `xds`
(streamed by the controllers over ADS). Owns reading the value and the rule that xds needs a controller; it
must not decide what xds delivery renders (mesh.config.compute does).

The inventory layer does not import mesh.config: Delivery and DELIVERIES here are mesh.config.xds's (a unit test
keeps them equal).
"""

from __future__ import annotations

from typing import Literal, cast

from mesh.inventory.data import InventoryData
from mesh.inventory.located import Located, Problems
from mesh.inventory.model import CONTROLLERS_GROUP
from mesh.inventory.values import describe
from mesh.suggest import did_you_mean

DELIVERY_KEY = "mesh_delivery"
Delivery = Literal["files", "xds"]
DELIVERIES: tuple[Delivery, ...] = ("files", "xds")


def read_delivery(spot: Located | None, problems: Problems) -> Delivery:
    """A host's delivery: `files` when unset; a value other than files or xds is recorded (and read as files)."""
    if spot is None:
        return "files"
    if isinstance(spot.value, str) and spot.value in DELIVERIES:
        return cast(Delivery, spot.value)
    hint = did_you_mean(spot.value.lower(), DELIVERIES) if isinstance(spot.value, str) else None
    problems.at(spot, f"expected files or xds, got {describe(spot.value)}", hint)
    return "files"


def check_controllers_for_xds(data: InventoryData, deliveries: list[tuple[Located | None, str]],
                              has_controller: bool, problems: Problems) -> None:
    """xds delivery streams config from the controllers: a managed host set to xds in an inventory without a
    mesh_controllers host is an error at the line that sets it (each place once)."""
    if has_controller:
        return
    groups = [name for name in data.groups if name not in ("all", "ungrouped")]
    hint = did_you_mean(CONTROLLERS_GROUP, groups) or f"add a group {CONTROLLERS_GROUP} with at least one host, " \
                                                       "or use mesh_delivery: files"
    for spot, delivery in deliveries:
        if delivery == "xds" and spot is not None:
            problems.at(spot, f"xds streams the proxies' config from the controllers, but no host "
                              f"is in the group {CONTROLLERS_GROUP}", hint)
