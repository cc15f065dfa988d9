"""Whether the Hugging Face Hub can be reached, asked once per process with one short TCP connection
(no retries), and offline mode for the rest of the process where it cannot: transformers and datasets
otherwise retry for tens of seconds before failing with a deep connection traceback."""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
_TRUE = ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def unreachable_reason(variables: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) -> str | None:
    """None if the Hub accepts a TCP connection within `PROBE_SECONDS`, else why not: one of the offline
    ``variables`` is set, or the connection failed (asked once per process and set of variables)."""
    from huggingface_hub import constants

    for var in variables:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as e:
        return f"{constants.ENDPOINT} cannot be reached: {e}"
    return None


def go_offline() -> None:
    """Hub offline mode for the rest of this process (what ``HF_HUB_OFFLINE=1`` does at start-up): files
    in the local cache load without any request. huggingface_hub reads the variable once, at import,
    so an already imported copy gets its flag set too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
