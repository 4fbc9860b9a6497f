"""A peer's metrics log (``heloco-peer join --metrics FILE``): one JSON object a line, appended,
each with the peer id, its name and the unix time besides the event's own fields. The testnet,
chaos.py, the report and the tests read these events (``round``, ``ack``, ``commit``,
``takeover``, ``checkpoint``, ``heartbeat`` ...); nothing in the protocol reads them back.
"""
from __future__ import annotations

import json
import threading
import time


class MetricsLog:
    """Appends events to ``path`` (nothing when it is None).

    Every thread of a peer logs (the training and submit threads, the node's event loop for
    commits, the maintenance and lease threads): one lock keeps each line whole.

    :param path: the JSONL file, or None for no log
    :param name: the peer's readable name as given (``--name``; may be empty)
    """

    def __init__(self, path: str | None, name: str = ""):
        self.path, self.name = path, name
        self.peer_id: str | None = None  # set once the node exists (before any other thread logs)
        self._lock = threading.Lock()

    def log(self, record: dict) -> None:
        if not self.path:
            return
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps({"peer": self.peer_id, "name": self.name, "time": time.time(), **record}) + "\n")
