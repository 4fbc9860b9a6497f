"""Checkpoints: sealed by a content digest, written atomically, and a run restarted from one.

A checkpoint round-trips bitwise; a flipped byte, a truncated file or altered content is refused
naming the file; a writer SIGKILLed in the middle of a write leaves the previous checkpoint
loadable and bitwise equal; ``heloco-peer join --resume`` restarts a stopped run at the
checkpoint's version with the checkpoint's θ.
"""
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from heloco_p2p.checkpoint import (
    CHECKPOINT_FILE,
    Checkpointer,
    CheckpointError,
    load_checkpoint,
    plan_resume,
    read_header,
    save_checkpoint,
    seal,
)
from heloco_p2p.outer import build_engine
from heloco_p2p.roles.commit_state import CommitState, params_digest
from heloco_p2p.swarm.lifetime import kill_group

ROOT = Path(__file__).resolve().parent.parent


def _tokenizer_json(tokenizer) -> str:
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return (Path(d) / "tokenizer.json").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def run_files(tiny_cfg, tokenizer):
    from heloco_p2p.data import tokenizer_digest

    return {"run_id": "ck-test", "config_yaml": tiny_cfg.to_yaml(), "config_digest": tiny_cfg.digest(),
            "tokenizer_json": _tokenizer_json(tokenizer), "tokenizer_digest": tokenizer_digest(tokenizer)}


def trained_state(seed: int = 0, commits: int = 4, term: int = 3, sizes=((64, 32), (32,), (32, 16))) -> CommitState:
    """A commit state with non-zero momentum, a ledger and a term, as a coordinator holds it."""
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(*s, generator=g) for s in sizes]
    engine = build_engine(theta, "lookahead", {"lr": 0.7, "momentum": 0.9}, "heloco", names=[f"p{i}" for i in range(len(sizes))])
    state = CommitState(engine, term=term)
    for i in range(commits):
        delta = [0.01 * torch.randn(*s, generator=g) for s in sizes]
        state.apply(delta, max(0, state.version - i % 2), f"peer{i % 2}", i, 10, 1.0)
    return state


def writer(directory, files, every=2) -> Checkpointer:
    names = ["p0", "p1", "p2"]
    return Checkpointer(directory, param_names=names, every=every, **files)


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b, where="state"):
    """Bitwise equality of nested checkpoint content (tensors: dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bits(a), _bits(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), (where, a, b)


def test_round_trip_is_bitwise_and_the_loaded_state_commits_identically(tmp_path, run_files):
    state = trained_state()
    assert any(float(t.abs().sum()) > 0 for t in tensors_in(state.engine.optimizer.state_dict())), "momentum must be non-zero"
    writer(tmp_path, run_files).write(state.state_dict())
    saved = load_checkpoint(tmp_path, config_digest=run_files["config_digest"], run_id="ck-test")
    assert (saved.version, saved.term, saved.run_id) == (4, 3, "ck-test")
    assert_same(saved.commit_state, state.state_dict())
    assert saved.config().digest() == run_files["config_digest"]
    assert (tmp_path / "config.yaml").read_text() == run_files["config_yaml"]

    restored = trained_state(seed=1, commits=0, term=0)  # other θ: everything must come from the file
    restored.load_state_dict(saved.commit_state)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):  # the restored replica goes on exactly like the original
        delta = [0.01 * torch.randn(*p.shape, generator=g) for p in state.engine.params]
        state.apply([d.clone() for d in delta], state.version, "peer9", 100 + _, 10, 1.0)
        restored.apply([d.clone() for d in delta], restored.version, "peer9", 100 + _, 10, 1.0)
    assert params_digest(state.engine.params) == params_digest(restored.engine.params)
    assert_same(restored.state_dict(), state.state_dict())


def test_every_flipped_byte_is_refused_or_harmless(tmp_path, run_files):
    """No single-byte corruption loads as different content: it is refused naming the file, or
    it hit bytes that carry no content (zip headers) and the content is bitwise the original."""
    state = trained_state()
    path = save_checkpoint(tmp_path, state.state_dict(), param_names=["p0", "p1", "p2"], **run_files)
    data = path.read_bytes()
    rng = random.Random(0)
    refused = digest_mismatch = 0
    for pos in rng.sample(range(len(data)), 40):
        corrupt = bytearray(data)
        corrupt[pos] ^= 0x5A
        path.write_bytes(bytes(corrupt))
        try:
            saved = load_checkpoint(tmp_path)
        except CheckpointError as exc:
            refused += 1
            digest_mismatch += "digest mismatch" in str(exc)
            assert str(path) in str(exc) and "corrupted" in str(exc), str(exc)
            continue
        assert_same(saved.commit_state, state.state_dict())
    assert refused >= 30 and digest_mismatch >= 20, (refused, digest_mismatch)  # most bytes are tensor data


def test_altered_content_in_a_valid_file_is_a_digest_mismatch(tmp_path, run_files):
    path = save_checkpoint(tmp_path, trained_state().state_dict(), param_names=["p0", "p1", "p2"], **run_files)
    state = torch.load(path, weights_only=True)
    state["commit_state"]["engine"]["params"][0][3, 4] += 1e-6  # the zip is valid; the content is not what was sealed
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"coordinator\.pt is corrupted \(digest mismatch"):
        load_checkpoint(tmp_path)
    torch.save(seal(state), path)  # sealed again, it is a valid checkpoint of that content
    assert load_checkpoint(tmp_path).params[0][3, 4] == state["commit_state"]["engine"]["params"][0][3, 4]


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_a_truncated_file_is_refused_naming_it(tmp_path, run_files, keep):
    path = save_checkpoint(tmp_path, trained_state().state_dict(), param_names=["p0", "p1", "p2"], **run_files)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert str(path) in str(err.value) and "corrupted" in str(err.value)


def test_a_checkpoint_of_another_run_or_config_is_refused(tmp_path, run_files):
    save_checkpoint(tmp_path, trained_state().state_dict(), param_names=["p0", "p1", "p2"], **run_files)
    with pytest.raises(CheckpointError, match="checkpoint of run 'ck-test', not 'other'; use --run-id ck-test"):
        load_checkpoint(tmp_path, run_id="other")
    with pytest.raises(CheckpointError, match="written for another config"):
        load_checkpoint(tmp_path, config_digest="0" * 64)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "missing")


def test_a_directory_holding_another_runs_checkpoint_is_not_overwritten(tmp_path, run_files):
    writer(tmp_path, run_files).write(trained_state().state_dict())
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    other = writer(tmp_path, {**run_files, "run_id": "another-run"})
    with pytest.raises(CheckpointError, match="holds run 'ck-test'.s checkpoint .*choose another --checkpoint-dir"):
        other.prepare()
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before


def test_the_directory_only_moves_forward(tmp_path, run_files):
    ck = writer(tmp_path, run_files, every=3)
    ck.prepare()
    newer = trained_state(commits=5, term=4).state_dict()
    assert ck.due(4, 5) and ck.write(newer) is not None
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    assert not ck.due(4, 5, force=True)  # already there
    assert not ck.due(4, 7) and ck.due(4, 8) and ck.due(4, 6, force=True)
    assert not ck.due(3, 9)  # an older term: a stale replica
    assert ck.write(trained_state(commits=6, term=3).state_dict()) is None
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert ck.due(5, 2)  # a new branch: resumed from an older checkpoint in a higher term
    fresh = writer(tmp_path, run_files, every=3)
    fresh.prepare()  # a restarted peer knows where the directory stands
    assert fresh.last == (4, 5) and not fresh.due(4, 6)


_KILLED_WRITER = r"""
import os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from tests.test_checkpoint import big_state, writer_files
from heloco_p2p.checkpoint import Checkpointer

directory, marker = Path(sys.argv[1]), Path(sys.argv[2])
ck = Checkpointer(directory, param_names=["big", "small"], every=1, **writer_files())
ck.prepare()
ck.write(big_state(1))  # the previous checkpoint, complete

real_fdopen = os.fdopen

class HalfThenHang:
    # the real writer's file: half of the bytes reach the disk, then the process hangs until killed
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        marker.write_text(str(len(data)))
        time.sleep(600)
    def __getattr__(self, name):
        return getattr(self.f, name)

os.fdopen = lambda fd, *a, **k: HalfThenHang(real_fdopen(fd, *a, **k))
ck.write(big_state(2))
"""


def big_state(version: int) -> dict:
    """A commit state of ~32 MB whose θ depends on ``version`` (deterministic)."""
    g = torch.Generator().manual_seed(version)
    theta = [torch.randn(2048, 4096, generator=g), torch.randn(64, generator=g)]
    engine = build_engine(theta, "nesterov", {"lr": 0.7, "momentum": 0.9}, names=["big", "small"])
    for _ in range(version):
        engine.commit([0.01 * torch.randn(*p.shape, generator=g) for p in theta], engine.version)
    return CommitState(engine, term=version).state_dict()


def writer_files() -> dict:
    return {"run_id": "kill-test", "config_yaml": "name: x\n", "config_digest": "c" * 64,
            "tokenizer_json": "{}", "tokenizer_digest": "t" * 64}


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    marker = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "ckpt"), str(marker), str(ROOT)],
                             cwd=ROOT, start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the writer never reached the middle of its second write"
            time.sleep(0.1)
        kill_group(child.pid)
        child.wait(10)
    finally:
        if child.poll() is None:
            kill_group(child.pid)
            child.wait(10)
    assert child.returncode == -signal.SIGKILL
    leftovers = list((tmp_path / "ckpt").glob(".coordinator.pt.*.tmp"))
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < int(marker.read_text())  # killed mid-write

    saved = load_checkpoint(tmp_path / "ckpt", run_id="kill-test")
    assert (saved.version, saved.term) == (1, 1)
    assert_same(saved.commit_state, big_state(1))

    ck = Checkpointer(tmp_path / "ckpt", param_names=["big", "small"], every=1, **writer_files())
    ck.prepare()  # a restarted peer removes what the killed write left and knows the version on disk
    assert not list((tmp_path / "ckpt").glob(".coordinator.pt.*.tmp")) and ck.last == (1, 1)


Claim = namedtuple("Claim", "peer_id term version")


def _saved(version=40, term=3):
    from heloco_p2p.checkpoint import SavedCheckpoint

    return SavedCheckpoint(path=Path("ck/coordinator.pt"), run_id="r", version=version, term=term, config_digest="c",
                           tokenizer_digest="t", param_names=[], commit_state={}, config_yaml="", tokenizer_json="",
                           written_at=0.0, digest="")


def test_resume_takes_the_role_above_every_term_seen_when_no_coordinator_lives():
    plan = plan_resume(_saved(), [], highest_term=7, swarm_version=52)
    assert plan.action == "take_over" and plan.term == 8
    assert "the 12 versions after the checkpoint are lost" in plan.message
    assert plan_resume(_saved(term=9), [], highest_term=0, swarm_version=0).term == 10


def test_resume_joins_a_swarm_that_holds_newer_state_and_refuses_one_behind_the_checkpoint():
    join = plan_resume(_saved(), [Claim("12D3KooWabcdefgh", 5, 40), Claim("x" * 16, 4, 60)], 5, 60)
    assert join.action == "join" and "joining it normally" in join.message
    refuse = plan_resume(_saved(), [Claim("12D3KooWabcdefgh", 6, 12)], 6, 12)
    assert refuse.action == "refuse" and "older than the checkpoint (version 40, term 3)" in refuse.message
    assert "stop the run's peers and resume again" in refuse.message


def test_join_resume_of_a_corrupted_checkpoint_fails_before_touching_the_network(tmp_path, run_files):
    from heloco_p2p.cli import main

    path = save_checkpoint(tmp_path, trained_state().state_dict(), param_names=["p0", "p1", "p2"], **run_files)
    path.write_bytes(path.read_bytes()[:-100])
    result = CliRunner().invoke(main, ["join", "--run-id", "ck-test", "--resume", str(tmp_path), "--log-level", "WARNING"])
    assert result.exit_code == 2, result.output
    assert f"--resume: {path} is corrupted" in result.stderr


@pytest.mark.slow
def test_join_resume_restarts_a_stopped_run_from_its_checkpoint(tmp_path):
    from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

    cfg = write_test_config(tmp_path / "cfg.yaml", checkpoint_every=2)
    sw = LocalSwarm(tmp_path, f"resume-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        # the standby writes checkpoints too
        sw.wait_until(lambda: [c for c in sw.events("b", "checkpoint") if c["role"] == "standby"]
                      and len(sw.events("a", "commit")) >= 6, 150, "a standby's checkpoint and 6 commits")
        assert load_checkpoint(tmp_path / "ckpt-b").version >= 2
        assert sw.stop("b") == 0
        assert sw.stop("a") == 0  # a coordinator checkpoints when it leaves: the run's last state
        last_commit = max(c["version"] for c in sw.events("a", "commit"))
        saved = load_checkpoint(tmp_path / "ckpt-a")
        assert saved.version == last_commit
        before = len(sw.events("a"))

        # nobody holds the run any more: --resume founds it again from the checkpoint
        sw.start("a", "de", "--resume", str(tmp_path / "ckpt-a"), "--max-rounds", "2", initial=False)
        assert sw.procs["a"].wait(120) == 0, (tmp_path / "a.log").read_text()[-3000:]
        after = sw.events("a")[before:]
        resume = next(e for e in after if e["event"] == "resume")
        assert resume["action"] == "take_over" and resume["checkpoint_version"] == saved.version
        takeover = next(e for e in after if e["event"] == "takeover")
        assert takeover["resumed"] and takeover["version"] == saved.version and takeover["term"] == saved.term + 1
        assert takeover["digest"] == params_digest(saved.params)  # θ at the start is the checkpoint's, bitwise
        assert next(e for e in after if e["event"] == "eval")["version"] == saved.version
        commits = [c["version"] for c in after if c["event"] == "commit"]
        assert commits == [saved.version + 1, saved.version + 2]
        final = load_checkpoint(tmp_path / "ckpt-a")
        assert (final.version, final.term) == (saved.version + 2, saved.term + 1)
        assert read_header(tmp_path / "ckpt-a")["version"] == saved.version + 2
    finally:
        sw.close()
        for name in sw.procs:
            assert not sw.group_alive(name), f"{name} left processes behind"


def test_the_chaos_history_check_finds_gaps_forks_and_lost_acknowledgements():
    """scripts/chaos.py's verdict (0 lost, 0 forks) is only worth something if it can say otherwise."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from chaos import check_history

    def commit(v, term, digest, peer="p1", seq=None, t=0.0):
        return {"event": "commit", "version": v, "term": term, "digest": digest, "peer": peer,
                "seq": v if seq is None else seq, "time": t or float(v)}

    def ack(v, digest, peer="p1", seq=None, duplicate=False):
        return {"event": "ack", "version": v, "digest": digest, "peer": peer, "seq": v if seq is None else seq,
                "duplicate": duplicate, "time": float(v) + 0.5, "name": peer}

    chain = [commit(v, 1, f"d{v}") for v in (1, 2, 3)] + [ack(v, f"d{v}") for v in (1, 2, 3)]
    clean = check_history(chain, None)
    assert (clean["gaps"], clean["forks"], clean["acked_but_lost"]) == ([], [], 0)
    # version 3 committed again in a later term with other θ (a coordinator died unreplicated, say):
    # its acknowledgement is lost, and a gap at 4 shows too
    forked = check_history(chain + [commit(3, 2, "other", peer="p2", seq=9, t=10.0), commit(5, 2, "d5")], None)
    assert forked["forks"] == [3] and forked["gaps"] == [4] and forked["acked_but_lost"] == 1
    assert forked["lost_examples"][0]["version"] == 3
    # a duplicate acknowledgement whose submission no commit holds
    dup = check_history(chain + [ack(3, "d3", seq=42, duplicate=True)], None)
    assert dup["acked_but_lost"] == 1 and dup["duplicate_acks"] == 1
    # the holder was killed after its standby applied version 4 and before it logged it: the
    # standby's replica event holds it, and the resubmission answered 'duplicate' by the heir is
    # not lost; the heir's own version 5 follows with no gap
    replica = {"event": "replica", "version": 4, "term": 1, "digest": "d4", "peer": "p1", "seq": 4, "time": 4.0}
    heir = chain + [replica, ack(5, "d5", seq=4, duplicate=True), commit(5, 2, "d5", peer="p2", seq=1)]
    held = check_history(heir, None)
    assert (held["gaps"], held["forks"], held["acked_but_lost"]) == ([], [], 0)
    assert check_history(chain + [ack(5, "d5", seq=4, duplicate=True), commit(5, 2, "d5", peer="p2", seq=1)],
                         None)["gaps"] == [4]  # without the replica event: the gap the check reported before
