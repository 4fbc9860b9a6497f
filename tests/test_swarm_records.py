"""DHT records: schemas, owner signatures, persistent identity, protocol-version refusal."""
import time

import pytest

from heloco_p2p.roles.joining import JoinError, find_genesis
from heloco_p2p.swarm.node import SwarmNode
from heloco_p2p.swarm.records import PROTOCOL_VERSION, GenesisRecord, LeaseRecord, PeerRecord

pytestmark = pytest.mark.slow  # real SwarmNodes (p2pd, DHT processes)


def lease(peer_id, term, renewed=None):
    return LeaseRecord(peer_id=peer_id, term=term, version=3, digest="d", standbys=[], maddrs=[],
                       renewed=renewed or time.time(), commits=0, rejected=0, commits_per_minute=0.0,
                       mean_staleness=0.0, branches={})


def peer_record(peer_id, **kw):
    base = dict(peer_id=peer_id, name="n", region="de", device="cpu", role="training", steps_per_second=1.0,
                inner_steps=10, version=1, rounds=1, tokens=10, loss=5.0, staleness=0, accepted=1, rejected=0,
                bytes_in=0, bytes_out=0, heartbeat=time.time(), maddrs=[])
    return PeerRecord(**{**base, **kw})


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    ident = tmp_path_factory.mktemp("ident")
    a = SwarmNode("rec", identity_dir=ident / "a")
    b = SwarmNode("rec", identity_dir=ident / "b", initial_peers=a.visible_maddrs())
    yield a, b, ident
    b.shutdown()
    a.shutdown()


def test_records_round_trip_between_peers(two_nodes):
    a, b, _ = two_nodes
    assert a.records.publish_peer(peer_record(a.peer_id, region="fr"), ttl=30)
    assert a.records.publish_lease(lease(a.peer_id, 2), ttl=30)
    assert b.records.publish_lease(lease(b.peer_id, 5), ttl=30)
    seen = {p.peer_id: p for p in b.records.peers()}
    assert seen[a.peer_id].region == "fr"
    claims = a.records.lease_claims()
    assert [c.term for c in claims[:2]] == [5, 2] and claims[0].peer_id == b.peer_id


def test_a_client_mode_record_is_stored_and_read_with_and_without_shards(two_nodes):
    """``client`` is stored only when true (a record of a normal peer is unchanged), and each
    combination of the optional fields passes the schema: client alone, and client with shards."""
    from heloco_p2p.swarm.records import record_dict

    a, b, _ = two_nodes
    assert "client" not in record_dict(peer_record(a.peer_id)) and "shards" not in record_dict(peer_record(a.peer_id))
    assert a.records.publish_peer(peer_record(a.peer_id, client=True), ttl=30)
    assert {p.peer_id: p for p in b.records.peers()}[a.peer_id].client is True
    assert a.records.publish_peer(peer_record(a.peer_id, client=True, shards={"1": "standby"}), ttl=30)
    seen = {p.peer_id: p for p in b.records.peers()}[a.peer_id]
    assert seen.client is True and seen.shards == {"1": "standby"}
    assert a.records.publish_peer(peer_record(a.peer_id, region="it"), ttl=30)
    seen = {p.peer_id: p for p in b.records.peers()}[a.peer_id]
    assert seen.client is False and seen.region == "it"


def test_a_peer_cannot_overwrite_another_peers_record(two_nodes):
    a, b, _ = two_nodes
    a.records.publish_peer(peer_record(a.peer_id, tokens=111), ttl=30)
    forged = peer_record(a.peer_id, tokens=999)
    # b writes under a's subkey: the signature validator refuses it everywhere
    from hivemind.utils import get_dht_time

    ok = b.dht.store("rec_peers", forged.dict(), expiration_time=get_dht_time() + 60, subkey=a.records.owner)
    assert not ok
    mine = [p for p in b.records.peers() if p.peer_id == a.peer_id]
    assert mine and mine[0].tokens == 111


def test_schema_refuses_wrong_types(two_nodes):
    a, _, _ = two_nodes
    from hivemind.utils import get_dht_time

    bad = {**peer_record(a.peer_id).dict(), "tokens": "many"}
    assert not a.dht.store("rec_peers", bad, expiration_time=get_dht_time() + 60, subkey=a.records.owner)


def test_identity_persists_across_restarts(tmp_path):
    first = SwarmNode("ident", identity_dir=tmp_path / "me")
    pid, owner = first.peer_id, first.records.owner
    first.shutdown()
    again = SwarmNode("ident", identity_dir=tmp_path / "me")
    try:
        assert again.peer_id == pid and again.records.owner == owner
    finally:
        again.shutdown()


def test_other_protocol_version_is_refused_with_a_clear_message(two_nodes):
    a, _, _ = two_nodes
    node = SwarmNode("proto", initial_peers=a.visible_maddrs())
    try:
        node.records.publish_genesis(GenesisRecord(protocol_version=PROTOCOL_VERSION + 1, run_id="proto",
                                                   config_digest="c", tokenizer_digest="t", max_versions=0,
                                                   max_tokens=0, created=time.time(), founder=node.peer_id))
        with pytest.raises(JoinError, match="protocol"):
            find_genesis(node.records, "proto", wait=2.0)
    finally:
        node.shutdown()



def test_rejoin_pings_peers_back_into_the_routing_table(two_nodes):
    a, b, _ = two_nodes
    assert a.rejoin([b.peer_id, a.peer_id]).result(30) == 1  # itself is never asked
    assert a.rejoin([]) is None
    dead = SwarmNode("rec")  # a peer that is gone by the time it is asked
    dead_id = dead.peer_id
    dead.shutdown()
    assert a.rejoin([dead_id, b.peer_id]).result(60) == 1


def test_a_client_mode_peer_cannot_found_a_run(tmp_path):
    """The founder is the run's first coordinator; a --client-mode peer cannot be dialled, so it is
    refused with what to do instead of starting a run no one can join."""
    from click.testing import CliRunner

    from heloco_p2p.cli import main

    result = CliRunner().invoke(main, ["join", "--run-id", "client-founder", "--config", "configs/tiny.yaml",
                                       "--client-mode", "--identity", str(tmp_path / "id"), "--log-level", "WARNING"])
    assert result.exit_code == 2, result.output
    assert "a --client-mode peer cannot start one" in result.output and "without --client-mode" in result.output


def test_the_record_validators_pickle_with_every_schema_variant():
    """hivemind may send validators to its DHT process (``SchemaValidator.__setstate__``): every
    generated schema must be importable by name, and the copy holds every one of them."""
    import pickle

    from hivemind.utils.crypto import RSAPrivateKey

    from heloco_p2p.swarm.records import VARIANT_SCHEMAS, make_validators

    schema, _ = make_validators("rec", RSAPrivateKey())
    copy = pickle.loads(pickle.dumps(schema[0]))
    assert len(copy._schemas) == 1 + len(VARIANT_SCHEMAS) == 5  # none; genesis shards; peers shards/client/both
    names = sorted(s.__name__ for s in VARIANT_SCHEMAS)
    assert names == ["RunSchema_genesis_shards", "RunSchema_peers_client", "RunSchema_peers_shards",
                     "RunSchema_peers_shards_client"]
