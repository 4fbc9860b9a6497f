"""The run's DHT records: schemas, signatures, and typed read/write helpers.

Four keys per run, each a dictionary whose subkeys are owned by one peer's RSA key (hivemind's
``RSASignatureValidator``: a subkey containing ``[owner:<public key>]`` can only be written with
that key's signature), and whose values must match a strict schema (``SchemaValidator``)::

    <run>_genesis      the run's identity: protocol, config and tokenizer digests, budget
    <run>_peers        one record per peer: region, speed, version, tokens, loss, role, heartbeat
    <run>_coordinator  one lease claim per claimant: term, version, standbys, addresses, θ digest, credit
    <run>_evals        one record per evaluator: validation loss per language of the global model

hivemind's SchemaValidator names keys ``<prefix>_<field>``, hence ``_`` rather than ``.``.
Monitoring reads only these records.

With a swarm key (``swarm/auth.py``), every record carries a ``mac`` over its fields, the run,
its kind and its owner's subkey; a ``RunRecords`` built with the key writes it and skips records
whose MAC does not verify (written by a peer without the key, or a keyed record copied under
another owner). Signatures stop anyone from overwriting another's record; the MAC stops a
stranger's records (a forged lease, a fake genesis, fake peers) from being believed.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 7  # 2: lease claims count only when signed by their holder (record_key)
# 3: replicate and handover only from the believed lease holder; acknowledged means replicated (min_replicas)
# 4: the commit log (a hash chain, replicated with the state and published by the coordinator)
# 5: the θ digest is a tree (roles/commit_state.params_digest); forwarded commits carry the norm clip's scale
# 6: topk blobs of chunks that keep every value carry no indices; topk_bits 1 (a sign code, mean scale)
# 7: a peer record says ``client`` (a --client-mode peer: never recruited as a standby, never coordinates)

StrictFloat, StrictInt, StrictStr, StrictBool = pydantic.StrictFloat, pydantic.StrictInt, pydantic.StrictStr, pydantic.StrictBool


class _GenesisFields(pydantic.BaseModel):
    protocol_version: StrictInt
    run_id: StrictStr
    config_digest: StrictStr
    tokenizer_digest: StrictStr
    max_versions: StrictInt  # 0: no budget in versions
    max_tokens: StrictInt  # 0: no budget in tokens
    created: StrictFloat
    founder: StrictStr  # peer id of the peer that started the run
    mac: StrictStr = ""  # swarm key MAC over the other fields (empty in an open run)


class GenesisRecord(_GenesisFields):
    # swarm.shards > 1: the shard of each parameter tensor, in trainable_params order (roles/shards.py);
    # not stored for one shard, so the record of an unsharded run is as it always was (OPTIONAL_EMPTY)
    shards: List[StrictInt] = []


class _PeerFields(pydantic.BaseModel):
    peer_id: StrictStr
    name: StrictStr
    region: StrictStr
    device: StrictStr
    role: StrictStr  # training | catching_up | coordinator | standby | observer
    steps_per_second: StrictFloat
    inner_steps: StrictInt  # H of its last round
    version: StrictInt  # global version its parameters are at
    rounds: StrictInt
    tokens: StrictInt
    loss: StrictFloat
    staleness: StrictInt  # of its last accepted submission
    accepted: StrictInt
    rejected: StrictInt
    bytes_in: StrictInt
    bytes_out: StrictInt
    heartbeat: StrictFloat
    maddrs: List[StrictStr]
    mac: StrictStr = ""


class PeerRecord(_PeerFields):
    # swarm.shards > 1: this peer's role in each shard it coordinates or stands by for ("0": "coordinator",
    # "1": "standby"); not stored when empty (an unsharded run: OPTIONAL_EMPTY)
    shards: Dict[StrictStr, StrictStr] = {}
    # joined with --client-mode: no peer can dial it, so it is never made a standby and never claims
    # the lease; not stored when false (OPTIONAL_EMPTY)
    client: StrictBool = False


class LeaseRecord(pydantic.BaseModel):
    peer_id: StrictStr
    term: StrictInt
    version: StrictInt
    digest: StrictStr  # digest of θ at `version`
    standbys: List[StrictStr]  # peer ids, in the order they claim
    maddrs: List[StrictStr]
    renewed: StrictFloat
    commits: StrictInt  # commits served in this term
    tokens: StrictInt = 0  # tokens committed in the whole run (toward genesis.max_tokens)
    rejected: StrictInt
    commits_per_minute: StrictFloat
    mean_staleness: StrictFloat
    branches: Dict[StrictStr, StrictInt]  # correction branches fired in this term
    # requests this coordinator refused, by sender and reason (the senders with the most refusals)
    rejections: Dict[StrictStr, Dict[StrictStr, StrictInt]] = {}
    # replication (swarm.min_replicas): a submission is acknowledged once min_replicas standbys hold it;
    # waiting_for_standby: fewer hold the state, submissions are answered busy until one is recruited
    min_replicas: StrictInt = 0
    replicas: StrictInt = 0
    waiting_for_standby: StrictBool = False
    # contribution credit as the coordinator saw it (CommitState.credit), the peers with most tokens:
    # peer id -> {commits, tokens, cosine_mean, kept, rotated, shrunk, norm_ratio}; and their regions
    credit: Dict[StrictStr, Dict[StrictStr, StrictFloat]] = {}
    credit_regions: Dict[StrictStr, StrictStr] = {}
    mac: StrictStr = ""


class EvalRecord(pydantic.BaseModel):
    """An evaluator's validation losses of the global model (``join --evaluator``), with a short
    history: entry i of each ``history_*`` list is one evaluation, oldest first."""

    peer_id: StrictStr
    name: StrictStr
    version: StrictInt  # the global version evaluated last
    time: StrictFloat
    mean: StrictFloat  # unweighted mean over the languages
    losses: Dict[StrictStr, StrictFloat]  # region -> validation loss (token-mean cross-entropy)
    history_versions: List[StrictInt] = []
    history_times: List[StrictFloat] = []
    history_means: List[StrictFloat] = []
    history_losses: List[Dict[StrictStr, StrictFloat]] = []
    mac: StrictStr = ""


class LogEntryRecord(pydantic.BaseModel):
    """One entry of the commit log's hash chain (roles/commit_log.py)."""

    version: StrictInt
    term: StrictInt
    peer: StrictStr
    seq: StrictInt
    base_version: StrictInt
    digest: StrictStr
    prev: StrictStr
    hash: StrictStr


class CommitLogRecord(pydantic.BaseModel):
    """The newest entries of the commit log, published by the coordinator under its owner subkey
    (so signed by its key): anyone can check that they form one chain and that the coordinators of
    different terms agree (``heloco-peer monitor``)."""

    peer_id: StrictStr
    term: StrictInt
    time: StrictFloat
    head: StrictStr  # the hash of the newest entry
    entries: List[LogEntryRecord]
    mac: StrictStr = ""


MAX_SHARDS = 32  # lease and commit-log keys exist for shards 1..MAX_SHARDS-1 (roles/shards.py)
# fields added after a record kind existed, left out of the stored value while empty: an unsharded
# run's records (and their MACs) are what they were before sharding existed
OPTIONAL_EMPTY = ("shards", "client")


def shard_field(field: str, shard: int) -> str:
    """The record kind of ``shard``'s lease or commit log: ``coordinator`` and ``commitlog`` for
    shard 0 (the keys of an unsharded run), ``coordinator_s<k>`` / ``commitlog_s<k>`` for shard k."""
    return field if shard == 0 else f"{field}_s{shard}"


_shard_keys = {shard_field(f, k): (Dict[BytesWithPublicKey, model], ...)
               for k in range(1, MAX_SHARDS) for f, model in (("coordinator", LeaseRecord), ("commitlog", CommitLogRecord))}
# hivemind's SchemaValidator accepts a record only if parsing it changes nothing, so a record with a
# field left out (OPTIONAL_EMPTY) and one with it set are validated by different schemas: one schema
# per combination of the optional fields a record kind has (the records as they were before any of
# them existed are the combination with none)
RunSchema = pydantic.create_model(
    "RunSchema", __module__=__name__,
    genesis=(Dict[BytesWithPublicKey, _GenesisFields], ...),
    peers=(Dict[BytesWithPublicKey, _PeerFields], ...),
    coordinator=(Dict[BytesWithPublicKey, LeaseRecord], ...),
    evals=(Dict[BytesWithPublicKey, EvalRecord], ...),
    commitlog=(Dict[BytesWithPublicKey, CommitLogRecord], ...),
    **_shard_keys,
)


def _with_required(base: type, full: type, fields: tuple[str, ...]) -> type:
    """``base`` plus ``fields`` of ``full``, each required (a stored optional field is never empty)."""
    model = pydantic.create_model(f"{base.__name__}_{'_'.join(fields)}", __module__=__name__, __base__=base,
                                  **{f: (full.__fields__[f].outer_type_, ...) for f in fields})
    globals()[model.__name__] = model  # importable by name, so a validator holding it pickles
    return model


def _variant_schemas() -> list[type]:
    """The run schemas for records that store one or more OPTIONAL_EMPTY fields: per record kind,
    every non-empty combination of its optional fields (genesis: shards; peers: shards, client)."""
    kinds = {"genesis": (_GenesisFields, GenesisRecord), "peers": (_PeerFields, PeerRecord)}
    schemas = []
    for kind, (base, full) in kinds.items():
        optional = [f for f in OPTIONAL_EMPTY if f in full.__fields__]
        for mask in range(1, 2 ** len(optional)):
            fields = tuple(f for i, f in enumerate(optional) if mask >> i & 1)
            schema = pydantic.create_model(f"RunSchema_{kind}_{'_'.join(fields)}", __module__=__name__,
                                           **{kind: (Dict[BytesWithPublicKey, _with_required(base, full, fields)], ...)})
            globals()[schema.__name__] = schema
            schemas.append(schema)
    return schemas


VARIANT_SCHEMAS = _variant_schemas()


def make_validators(run_id: str, private_key) -> tuple[list, RSASignatureValidator]:
    """Record validators for a DHT that takes part in ``run_id``: schema + owner signatures."""
    signer = RSASignatureValidator(private_key)
    schema = SchemaValidator(RunSchema, allow_extra_keys=True, prefix=run_id)
    for variant in VARIANT_SCHEMAS:
        schema.merge_with(SchemaValidator(variant, allow_extra_keys=True, prefix=run_id))
    return [schema, signer], signer


def record_dict(model: pydantic.BaseModel) -> dict:
    """A record as the plain dict the DHT stores (strict types preserved; ``OPTIONAL_EMPTY``
    fields only when set)."""
    value = model.dict()
    for key in OPTIONAL_EMPTY:
        if key in value and not value[key]:
            del value[key]
    return value


class RunRecords:
    """Typed access to one run's records through a ``hivemind.DHT``.

    :param dht: a running hivemind.DHT built with ``make_validators(run_id, key)``
    :param run_id: the run's name
    :param signer: the RSASignatureValidator whose key owns this peer's subkeys
    :param swarm_key: the run's ``SwarmKey``: records are MACed with it, and records without a
        valid MAC are not returned (None: an open run, every well-formed record is returned)
    """

    def __init__(self, dht, run_id: str, signer: RSASignatureValidator, swarm_key=None, shard: int = 0):
        self.dht, self.run_id, self.signer, self.swarm_key = dht, run_id, signer, swarm_key
        self.shard = shard  # whose lease and commit log this object reads and writes (``for_shard``)
        self.ignored = 0  # records skipped because their MAC did not verify
        self._warned: set[str] = set()

    def for_shard(self, shard: int) -> "RunRecords":
        """The same records, with the lease and commit log of ``shard`` (genesis, peers and evals
        are the run's)."""
        return self if shard == self.shard else RunRecords(self.dht, self.run_id, self.signer, self.swarm_key, shard)

    @property
    def owner(self) -> bytes:
        return self.signer.local_public_key

    def _key(self, field: str) -> str:
        return f"{self.run_id}_{field}"

    def _store(self, field: str, model: pydantic.BaseModel, ttl: float, await_all_replicas: bool = True) -> bool:
        value = record_dict(model)
        if self.swarm_key is not None:
            value["mac"] = self.swarm_key.sign_record(self.run_id, field, self.owner, value)
        return bool(self.dht.store(self._key(field), value, expiration_time=get_dht_time() + ttl,
                                   subkey=self.owner, await_all_replicas=await_all_replicas))

    def _read(self, field: str, model: type) -> dict[bytes, Any]:
        found = self.dht.get(self._key(field), latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        out = {}
        for subkey, item in found.value.items():
            if self.swarm_key is not None and not (
                    isinstance(subkey, bytes) and isinstance(item.value, dict)
                    and self.swarm_key.verify_record(self.run_id, field, subkey, item.value)):
                self.ignored += 1
                if field not in self._warned:
                    self._warned.add(field)
                    logger.warning("ignoring %s records of run %s without a valid MAC for swarm key %s: written by "
                                   "peers without the key or with another one", field, self.run_id,
                                   self.swarm_key.fingerprint)
                continue
            try:
                out[subkey] = model.parse_obj(item.value)
            except pydantic.ValidationError:
                continue  # the validators already refuse these; be defensive against old records
        return out

    # genesis ------------------------------------------------------------------------------
    def publish_genesis(self, record: GenesisRecord, ttl: float = 7 * 24 * 3600) -> bool:
        return self._store("genesis", record, ttl)

    def genesis(self) -> Optional[GenesisRecord]:
        records = self.genesis_records()
        return records[0] if records else None  # the earliest genesis (a joiner chooses: roles/joining.py)

    def genesis_records(self) -> list[GenesisRecord]:
        """Every genesis record of the run id, earliest first (in an open run anyone can publish one)."""
        return sorted(self._read("genesis", GenesisRecord).values(), key=lambda r: r.created)

    # peers --------------------------------------------------------------------------------
    def publish_peer(self, record: PeerRecord, ttl: float) -> bool:
        return self._store("peers", record, ttl)

    def peers(self) -> list[PeerRecord]:
        return list(self._read("peers", PeerRecord).values())

    def withdraw_peer(self, record: PeerRecord, ttl: float) -> bool:
        """Leave: overwrite our record with role ``left``. hivemind keeps the value with the later
        expiration, so ``ttl`` must outlast the last heartbeat's."""
        record = record.copy(update={"role": "left", "heartbeat": time.time()})
        return self._store("peers", record, ttl=ttl)

    # evaluations --------------------------------------------------------------------------
    def publish_eval(self, record: EvalRecord, ttl: float) -> bool:
        return self._store("evals", record, ttl)

    def evals(self) -> list[EvalRecord]:
        """Every evaluator's latest record, newest first."""
        return sorted(self._read("evals", EvalRecord).values(), key=lambda r: -r.time)

    # commit log ---------------------------------------------------------------------------
    def publish_commit_log(self, record: CommitLogRecord, ttl: float) -> bool:
        return self._store(shard_field("commitlog", self.shard), record, ttl, await_all_replicas=False)

    def commit_logs(self) -> list[tuple[bytes, CommitLogRecord]]:
        """Every coordinator's latest published log (with the owner key that signed it), newest term first."""
        return sorted(self._read(shard_field("commitlog", self.shard), CommitLogRecord).items(), key=lambda oc: (-oc[1].term, -oc[1].time))

    # lease --------------------------------------------------------------------------------
    def publish_lease(self, record: LeaseRecord, ttl: float) -> bool:
        """Returns once one DHT node stored the claim (the others in the background): a frozen
        node among the replicas must not hold up the renewal of a lease for its wait timeout."""
        return self._store(shard_field("coordinator", self.shard), record, ttl, await_all_replicas=False)

    def lease_claims(self) -> list[LeaseRecord]:
        """Every unexpired claim, highest term first (ties: most recently renewed first)."""
        return [claim for _, claim in self.lease_claims_by_owner()]

    def lease_claims_by_owner(self) -> list[tuple[bytes, LeaseRecord]]:
        """``lease_claims`` with the owner key (subkey) that signed each: a claim is its named
        peer's only if that key is the peer's own (``roles/lease.py``)."""
        claims = self._read(shard_field("coordinator", self.shard), LeaseRecord).items()
        return sorted(claims, key=lambda oc: (oc[1].term, oc[1].renewed), reverse=True)
