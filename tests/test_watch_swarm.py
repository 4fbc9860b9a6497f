"""Watching and checking a real swarm as a person would: three peers on 127.0.0.1, the dashboard
as its own process fetched over HTTP (JSON, Prometheus text parsed by prometheus_client, the page
rendered by headless Chromium), and ``doctor`` run against the live swarm. One swarm for all.
"""
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from heloco_p2p.cli import main
from heloco_p2p.swarm.lifetime import kill_group, terminate_group
from heloco_p2p.tools.launcher import ROOT, LocalSwarm, write_test_config
from heloco_p2p.tools.monitor import COORDINATOR_KEYS, PEER_KEYS

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REGIONS = {"a": "de", "b": "fr", "c": "es"}


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def get_json(url: str) -> dict:
    return json.loads(get(url))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Three peers of one run, each with at least one accepted submission."""
    tmp = tmp_path_factory.mktemp("watch-swarm")
    cfg = write_test_config(tmp / "cfg.yaml")
    sw = LocalSwarm(tmp, f"watch-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", REGIONS["a"], "--config", str(cfg))
        sw.start("b", REGIONS["b"])
        sw.start("c", REGIONS["c"])
        sw.wait_until(lambda: all(sw.events(n, "ack") for n in REGIONS), 180, "every peer's first acknowledgement")
        yield sw
    finally:
        sw.close()


@pytest.fixture(scope="module")
def dashboard(swarm, tmp_path_factory):
    """``heloco-peer dashboard`` as its own process; yields its base URL once it shows all three
    peers alive, a coordinator and a few history samples."""
    tmp = tmp_path_factory.mktemp("dashboard")
    out, err = open(tmp / "out", "w"), open(tmp / "err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "heloco_p2p", "dashboard", "--run-id", swarm.run_id,
                             "--initial-peers", swarm.maddr, "--port", "0", "--interval", "1", "--silent-after", "5",
                             "--lease-seconds", "4", "--log-level", "WARNING"],
                            stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
    try:
        deadline, url = time.time() + 90, None
        while time.time() < deadline and url is None:
            assert proc.poll() is None, (tmp / "err").read_text()
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", (tmp / "out").read_text())
            url = m.group(1) if m else None
            time.sleep(0.3)
        assert url, f"no URL printed: {(tmp / 'err').read_text()}"
        while time.time() < deadline:
            state = get_json(url + "api/swarm.json")
            if (state["coordinator"] and sum(p["alive"] for p in state["peers"]) == 3 and len(state["history"]["time"]) >= 3
                    and all(p["last_loss"] is not None for p in state["peers"])):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the dashboard never showed the swarm: {state}")
        yield url
    finally:
        terminate_group(proc.pid, grace=15)
        proc.wait(5)


def test_swarm_json_has_the_monitor_keys_the_history_and_every_peer(swarm, dashboard):
    state = get_json(dashboard + "api/swarm.json")
    assert {"coordinator", "peers", "credit", "validation", "commit_log", "history", "run"} == set(state)
    assert tuple(state["coordinator"]) == COORDINATOR_KEYS
    rows = {p["name"]: p for p in state["peers"]}
    assert set(rows) == set(REGIONS)
    assert all(tuple(p) == PEER_KEYS for p in rows.values())
    assert {n: p["region"] for n, p in rows.items()} == REGIONS
    assert all(p["alive"] and p["tokens"] > 0 and p["inner_steps"] == 10 and p["reachability"] == "direct"
               for p in rows.values())
    assert state["coordinator"]["peer_id"] in {p["peer_id"] for p in rows.values()}
    # the coordinator's published commit log, checked by the dashboard's monitor: one chain, no fork
    log = state["commit_log"]
    assert log is not None and log["ok"] and log["forks"] == [] and log["last"] >= log["first"] >= 1, log
    assert state["run"]["run_id"] == swarm.run_id and state["run"]["genesis"]["run_id"] == swarm.run_id
    h = state["history"]
    n = len(h["time"])
    assert n >= 3 and h["time"] == sorted(h["time"])
    assert set(h["peers"]["tokens"]) == set(REGIONS) and set(h["regions"]["tokens"]) == set(REGIONS.values())
    assert all(len(series) == n for group in ("tokens", "loss", "staleness") for series in h["peers"][group].values())
    tokens_a = [t for t in h["peers"]["tokens"]["a"] if t is not None]
    assert tokens_a == sorted(tokens_a) and tokens_a[-1] <= rows["a"]["tokens"]  # counts only grow


def test_metrics_parse_and_match_the_swarm(dashboard):
    text = get(dashboard + "metrics").decode()
    state = get_json(dashboard + "api/swarm.json")  # read after: counts can only have grown
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1 and not f.samples[0].labels}
    rows = {p["peer_id"]: p for p in state["peers"]}
    assert value["heloco_coordinator_live"] == 1.0 and value["heloco_peers_alive"] == 3.0
    assert value["heloco_term"] == state["coordinator"]["term"]
    assert value["heloco_version"] <= state["coordinator"]["version"]
    tokens = {s.labels["peer_id"]: s for s in families["heloco_peer_tokens"].samples}
    assert set(tokens) == set(rows)  # one series per peer
    for pid, sample in tokens.items():
        assert sample.labels["name"] == rows[pid]["name"] and sample.labels["region"] == rows[pid]["region"]
        assert 0 < sample.value <= rows[pid]["tokens"]
    assert {s.labels["peer_id"]: s.value for s in families["heloco_peer_inner_steps"].samples} == {p: 10.0 for p in rows}
    assert {s.labels["region"] for s in families["heloco_region_tokens"].samples} == set(REGIONS.values())
    roles = {s.labels["name"]: s.labels["role"] for s in families["heloco_peer_info"].samples}
    coordinator = rows[state["coordinator"]["peer_id"]]["name"]
    assert roles[coordinator] == "coordinator"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_the_page_in_a_browser_shows_the_coordinator_every_peer_and_charts(swarm, dashboard, tmp_path):
    state = get_json(dashboard + "api/swarm.json")
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--virtual-time-budget=5000", "--window-size=1280,1600"]
    dom = subprocess.run(args + ["--dump-dom", dashboard], capture_output=True, text=True, timeout=90).stdout
    m = re.search(r'id="coordinator" data-peer-id="([^"]+)">([^<]+)<', dom)
    assert m, dom[:2000]
    assert m.group(1) == state["coordinator"]["peer_id"]
    rows = re.findall(r'<tr class="peer [a-z_]+" data-peer-id="([^"]+)">', dom)
    assert sorted(rows) == sorted(p["peer_id"] for p in state["peers"])
    points = dict(re.findall(r'id="chart-([a-z-]+)" data-points="(\d+)"', dom))
    assert int(points["training-loss"]) > 0 and int(points["tokens-peer"]) >= 3  # loss and token lines are drawn
    assert dom.count("<canvas") >= 2  # uPlot drew them
    shot = tmp_path / "dashboard.png"
    subprocess.run(args + [f"--screenshot={shot}", dashboard], capture_output=True, timeout=90)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def run_doctor(tmp_path, *args: str, timeout: float = 120) -> tuple[int, dict]:
    """``heloco-peer doctor --json`` as its own process. Output goes to a file: a grandchild
    (torch_shm_manager) keeps pipes open for seconds after the doctor exits."""
    out = tmp_path / "doctor.out"
    with open(out, "w") as o:
        proc = subprocess.Popen([sys.executable, "-m", "heloco_p2p", "doctor", *args, "--json", "--log-level", "WARNING"],
                                stdout=o, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout)
        finally:
            kill_group(proc.pid)  # whatever it left (nothing, normally)
    return code, json.loads(out.read_text().strip().splitlines()[-1])


def test_doctor_passes_against_the_live_swarm(swarm, tmp_path):
    code, report = run_doctor(tmp_path, "--run-id", swarm.run_id, "--initial-peers", swarm.maddr, "--bench-seconds",
                              "1", "--checkpoint-dir", str(tmp_path), "--threads", "1")
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0 and report["ok"], report
    assert list(checks) == ["initial peers", "run", "reachability", "clock", "run files", "bandwidth", "device",
                            "throughput", "disk"]
    assert all(c["status"] == "ok" for c in checks.values()), report
    assert checks["reachability"]["values"]["peers_that_dialed_back"] >= 1
    assert abs(checks["clock"]["values"]["max_skew_seconds"]) < 1.0  # one machine, one clock
    bw = checks["bandwidth"]["values"]
    assert bw["download_bytes"] > 4 * bw["param_count"]  # θ in fp32, plus its layout
    t = checks["throughput"]["values"]
    assert t["steps_per_second"] > 0 and t["inner_steps"] == 10 and t["batch_size"] == 8
    assert t["round_seconds"] == pytest.approx(t["compute_seconds"] + t["transfer_seconds"])
    assert checks["run"]["values"]["peers_alive"] == 3


def test_doctor_fails_for_a_run_that_does_not_exist(swarm, tmp_path):
    # in this process (the command's imports are paid already); the live test above runs it as a person would
    result = CliRunner().invoke(main, ["doctor", "--run-id", "no-such-run", "--initial-peers", swarm.maddr, "--timeout",
                                       "1", "--checkpoint-dir", str(tmp_path), "--json", "--log-level", "WARNING"])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    checks = {c["name"]: c for c in report["checks"]}
    assert result.exit_code == 1 and not report["ok"]
    assert checks["initial peers"]["status"] == "ok" and checks["run"]["status"] == "fail"
    assert "--run-id" in checks["run"]["fix"]
