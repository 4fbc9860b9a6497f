"""What a peer's own submissions came to: the sequence number of the next one, counts of the
accepted and refused ones, the tokens they carried, the last staleness, and the last
acknowledgements. The heartbeat publishes the counts (``PeerRecord``); every acknowledgement
also goes to the metrics log, whose ``ack`` events are the full history (chaos.py, the testnet).
"""
from __future__ import annotations

import time
from collections import deque

from heloco_p2p.roles.commit_state import params_digest
from heloco_p2p.roles.submit import SubmitOutcome

# acknowledgements kept in memory: no reader needs more than the recent ones (the full history
# is the metrics log's), and a peer that runs for weeks must not grow by one dict a round
ACKS_KEPT = 256


class SubmitTally:
    """Written by the thread that submits (the training thread; with overlapped rounds the one
    ``submit`` thread in flight: never two at once), read by the maintenance thread for the
    heartbeat (int attributes: a read sees the old value or the new one)."""

    def __init__(self):
        # above every sequence number an earlier process with this identity used: the ledger must
        # not take a restarted peer's new submissions for duplicates of its old ones
        self.seq = time.time_ns() // 1000
        self.accepted = self.rejected = self.tokens = 0
        self.last_staleness = 0
        self.acks: deque[dict] = deque(maxlen=ACKS_KEPT)  # the last ACKS_KEPT acknowledgements, oldest first

    def ack(self, out: SubmitOutcome, stats, compute: float, compression: str, seq: int | None = None,
            count: bool = True) -> dict:
        """Count an accepted submission (``out``, of the round ``stats``); returns its ``ack`` event.
        With shards: ``seq`` is the part's number, and only one part of a round is ``count``-ed."""
        reply = out.reply
        if count:
            self.accepted += 1
            self.tokens += stats.tokens
        self.last_staleness = int(reply["staleness"] or 0)
        ack = {"event": "ack", "seq": self.seq if seq is None else seq, "version": out.version, "term": int(reply["term"]),
               "digest": params_digest(out.params) if out.params is not None else None, "duplicate": bool(reply.get("duplicate")),
               "staleness": reply.get("staleness"), "loss": stats.loss, "tokens": stats.tokens, "steps": stats.steps,
               "compute_seconds": compute, "rtt": out.rtt, "serialize_seconds": out.serialize_seconds,
               "bytes": out.payload_bytes, "reply_bytes": out.reply_bytes, "server": reply.get("timing", {}),
               "attempts": out.attempts, "compression": compression,
               "reply_encoding": reply.get("params_encoding", "dense"), "reply_bits_per_param": out.reply_bits_per_param,
               "reply_resync": out.resync, "reply_drift_rel_l2": reply.get("drift_rel_l2")}
        self.acks.append(ack)
        return ack

    def refused(self, out: SubmitOutcome) -> dict:
        """Count a refused submission; returns its ``rejected`` event."""
        self.rejected += 1
        return {"event": "rejected", "reason": out.reason, "message": out.reply.get("message")}
