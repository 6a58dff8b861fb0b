"""This box's name, carried by ``/admin/status``, ``/admin/events``, ``/ready``, ``understudy
events --json`` and ``/metrics`` (``understudy_box_info``), so that several boxes behind one load
balancer are told apart in one picture. ``$UNDERSTUDY_BOX_ID``, else the host name."""

from __future__ import annotations

import os
import socket


def box_id() -> str:
    return os.environ.get("UNDERSTUDY_BOX_ID") or socket.gethostname()
