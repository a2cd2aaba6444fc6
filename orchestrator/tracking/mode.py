"""Which W&B mode a run gets: ``auto`` is online with credentials, else offline."""

from __future__ import annotations

import netrc
import os
from typing import Literal


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_mode(setting: Literal["auto", "online", "offline", "disabled"]
               ) -> Literal["online", "offline", "disabled"]:
    """``wandb.mode`` with ``auto`` resolved: online with credentials, else offline."""
    if setting == "auto":
        return "online" if has_credentials() else "offline"
    return setting
