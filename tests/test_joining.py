"""Joining rules with fakes: which genesis a joiner follows, and a peer that reads nobody alive
asking the peers it knew again (roles/joining.py, roles/election.py)."""
import time
from types import SimpleNamespace

import pytest

from heloco_p2p.config import load_config
from heloco_p2p.roles.election import Election
from heloco_p2p.roles.joining import JoinError, choose_genesis
from heloco_p2p.swarm.records import PROTOCOL_VERSION, GenesisRecord, PeerRecord


def _genesis(config: str, created: float, founder: str = "QmFounder", max_versions: int = 0):
    return GenesisRecord(protocol_version=PROTOCOL_VERSION, run_id="r", config_digest=config, tokenizer_digest="t",
                         max_versions=max_versions, max_tokens=0, created=created, founder=founder)


def test_a_fake_genesis_does_not_silently_redefine_a_run():
    real = _genesis("c0ffee" + "0" * 26, created=100.0)
    # a stranger publishes another run under the same id, earlier, with a budget of one version
    fake = _genesis("bad" + "0" * 29, created=1.0, founder="QmMallory", max_versions=1)
    copy = _genesis(real.config_digest, created=200.0, founder="QmOther")  # the same run published again
    assert choose_genesis("r", [real, copy]) is real  # one run, the earliest record
    with pytest.raises(JoinError, match="2 different genesis records.*--genesis-digest"):
        choose_genesis("r", [fake, real])
    # the peers this peer joined through serve the real run: it is followed
    assert choose_genesis("r", [fake, real], vouched=lambda: {real.config_digest}) is real
    with pytest.raises(JoinError, match="vouch for none of them"):
        choose_genesis("r", [fake, real], vouched=lambda: set())
    # pinned by the operator
    assert choose_genesis("r", [fake, real], pinned="c0ff") is real
    with pytest.raises(JoinError, match="starting with 'abc'"):
        choose_genesis("r", [fake, real], pinned="abc")
    old = _genesis(real.config_digest, created=100.0).copy(update={"protocol_version": PROTOCOL_VERSION - 1})
    with pytest.raises(JoinError, match="speaks protocol"):
        choose_genesis("r", [old])


class _Node:
    """What the election reads and calls: peer records, and rejoin (recorded)."""

    peer_id = "QmSelf"

    def __init__(self):
        self.peers, self.asked = [], []
        self.records = SimpleNamespace(peers=lambda: list(self.peers))

    def rejoin(self, ids):
        ids = [i for i in ids if i != self.peer_id]
        self.asked.append(sorted(set(ids)))
        return object() if ids else None


def _peer(peer_id: str, heartbeat: float) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, name="n", region="de", device="cpu", role="training", steps_per_second=1.0,
                      inner_steps=1, version=0, rounds=1, tokens=0, loss=1.0, staleness=0, accepted=0, rejected=0,
                      bytes_in=0, bytes_out=0, heartbeat=heartbeat, maddrs=[])


def test_a_peer_that_reads_nobody_alive_asks_the_peers_it_knew_at_most_once_a_lease(monkeypatch):
    cfg = load_config("configs/tiny.yaml")
    node = _Node()
    service = SimpleNamespace(term=SimpleNamespace(verify_lease=None), standby=SimpleNamespace(on_handover=None))
    monkeypatch.setattr("heloco_p2p.roles.election.lease_rules.holder_keys", lambda node: None)
    el = Election(node, cfg, service, stop_event=None, log_metric=lambda r: None)
    initial = ["/ip4/10.0.0.1/tcp/1/p2p/QmBootstrap"]
    node.peers = [_peer("QmB", time.time())]
    assert el.rejoin_if_alone(initial) is False and node.asked == []  # someone is alive
    node.peers = [_peer("QmB", time.time() - 3600)]  # its record went stale: cut off
    assert el.rejoin_if_alone(initial) is True
    assert node.asked == [["QmB", "QmBootstrap"]]
    assert el.rejoin_if_alone(initial) is False and len(node.asked) == 1  # once a lease period
    el._last_rejoin -= cfg.swarm.lease_seconds
    assert el.rejoin_if_alone(initial) is True and len(node.asked) == 2
    # a founder that never saw anyone and has no initial peer asks nobody
    lone = Election(_Node(), cfg, service, stop_event=None, log_metric=lambda r: None)
    assert lone.rejoin_if_alone([]) is False
