"""Whether the Hugging Face hub's network is worth asking: one short probe per process."""

from __future__ import annotations

import os
import socket
import urllib.parse

HUB_PROBE_TIMEOUT_S = 3.0
_hub_probes: dict[str, str] = {}  # endpoint -> "" (reachable) or why not; one probe per process


def hub_unreachable() -> str:
    """Why the Hugging Face hub's network must not be asked, or "" when it may be.

    `HF_HUB_OFFLINE` set, or one TCP connection to the hub's endpoint (`HF_ENDPOINT`) that fails within
    `HUB_PROBE_TIMEOUT_S`: without network, every huggingface_hub call retries for ~25-40 s before failing,
    and callers (the model's download, the tokenizer's) then use local copies only.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if endpoint not in _hub_probes:
        parts = urllib.parse.urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            _hub_probes[endpoint] = ""
        except (OSError, ValueError, TypeError) as e:
            _hub_probes[endpoint] = (f"{parts.hostname}:{port} did not answer a {HUB_PROBE_TIMEOUT_S:g} s probe "
                                     f"({type(e).__name__}: {e})")
    return _hub_probes[endpoint]


