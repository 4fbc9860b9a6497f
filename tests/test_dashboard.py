"""The dashboard without a swarm: its history, its Prometheus series and its HTTP routes, over
hand-made records (tests/test_watch_swarm.py runs it against real peers and a browser)."""
import copy
import html
import json
import re
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_monitor import NOW, FakeRecords, ShardedRecords, claim, peer  # the monitor tests' record builders

from heloco_p2p.tools.dashboard import METRICS, Dashboard, DashboardServer, History
from heloco_p2p.tools.monitor import PEER_KEYS, Monitor, snapshot


def fill(records: FakeRecords, dash: Dashboard, polls: int) -> None:
    """``polls`` polls 5 s apart of peers a (de) and b (fr), their tokens growing, and lease of a."""
    for i in range(polls):
        now = NOW + 5 * i
        records.peer_records = [peer("a", region="de", tokens=100 * (i + 1), loss=6.0 - 0.1 * i, heartbeat=now,
                                     accepted=i + 1, staleness=i % 2),
                                peer("b", region="fr", tokens=50 * (i + 1), loss=6.5, heartbeat=now, accepted=i + 1)]
        records.claims = [claim("a", 2, renewed=now, tokens=150 * (i + 1), branches={"kept": i, "rotated": 1})]
        dash.poll_once(now)


def test_history_is_columnar_aligned_and_bounded():
    records = FakeRecords()
    dash = Dashboard(Monitor(records), "demo", max_samples=4)
    fill(records, dash, 6)
    h = dash.history.export()
    assert h["time"] == [NOW + 5 * i for i in range(2, 6)]  # the last 4 of 6
    assert h["peers"]["tokens"] == {"a": [300, 400, 500, 600], "b": [150, 200, 250, 300]}
    assert h["regions"]["tokens"] == {"de": [300, 400, 500, 600], "fr": [150, 200, 250, 300]}
    assert h["regions"]["loss"]["de"] == pytest.approx([5.8, 5.7, 5.6, 5.5])
    assert h["branches"] == {"kept": [2, 3, 4, 5], "rotated": [1, 1, 1, 1]}
    assert h["run_tokens"] == [450, 600, 750, 900] and h["version"] == [20] * 4


def test_a_peer_that_joins_later_has_gaps_before_it():
    history = History()
    history.add(snapshot([peer("a")], [], NOW), None, NOW)
    history.add(snapshot([peer("a"), peer("b", tokens=7)], [], NOW + 1), None, NOW + 1)
    assert history.export()["peers"]["tokens"] == {"a": [4096, 4096], "b": [None, 7]}
    assert history.export()["version"] == [None, None]  # no lease, no version


def test_validations_are_kept_per_language_with_the_mean():
    dash = Dashboard(Monitor(FakeRecords()), "demo")
    dash.record_validation(3, 5.5, {"de": 5.0, "fr": 6.0}, now=NOW)
    dash.record_validation(9, 5.0, {"de": 4.5, "fr": 5.5, "es": 5.0}, now=NOW + 30)
    v = dash.history.export()["validation"]
    assert v == {"time": [NOW, NOW + 30], "version": [3, 9], "mean": [5.5, 5.0],
                 "per_language": {"de": [5.0, 4.5], "es": [None, 5.0], "fr": [6.0, 5.5]}}


def test_metrics_have_one_series_per_peer_and_language_with_the_records_values():
    records = FakeRecords()
    dash = Dashboard(Monitor(records), "demo")
    fill(records, dash, 2)
    dash.record_validation(20, 5.25, {"de": 5.0, "fr": 5.5}, now=NOW + 10)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(dash.registry).decode())}
    assert set(families) <= set(METRICS)

    def by(name, label):
        return {s.labels[label]: s.value for s in families[name].samples}

    assert by("heloco_peer_tokens", "name") == {"a": 200.0, "b": 100.0}
    assert by("heloco_peer_loss", "peer_id") == {"Qma": pytest.approx(5.9), "Qmb": 6.5}
    assert by("heloco_region_tokens", "region") == {"de": 200.0, "fr": 100.0}
    assert by("heloco_validation_loss", "region") == {"de": 5.0, "fr": 5.5}
    assert families["heloco_validation_loss_mean"].samples[0].value == 5.25
    assert by("heloco_correction_branches", "branch") == {"kept": 1.0, "rotated": 1.0}
    assert families["heloco_term"].samples[0].value == 2 and families["heloco_run_tokens"].samples[0].value == 300
    assert {s.labels["region"] for s in families["heloco_peer_tokens"].samples} == {"de", "fr"}


def test_a_peer_without_a_loss_yet_has_no_loss_sample():
    records = FakeRecords()
    records.peer_records = [peer("new", accepted=0, loss=-1.0)]
    dash = Dashboard(Monitor(records), "demo")
    dash.poll_once(NOW)
    text = generate_latest(dash.registry).decode()
    assert "heloco_peer_loss{" not in text and "heloco_peer_staleness{" not in text
    assert 'heloco_peer_tokens{name="new",peer_id="Qmnew",region="de"} 4096.0' in text


class FailingRecords(FakeRecords):
    def peers(self):
        raise TimeoutError("DHT did not answer")


def test_a_failed_poll_keeps_the_last_snapshot_and_says_why():
    records = FakeRecords()
    dash = Dashboard(Monitor(records), "demo")
    fill(records, dash, 1)
    dash.monitor.records = FailingRecords()
    dash.poll_once(NOW + 5)
    state = dash.state()
    assert [p["name"] for p in state["peers"]] == ["a", "b"]
    assert "DHT did not answer" in state["run"]["error"] and state["run"]["polled_at"] == NOW


def test_http_routes_serve_the_page_the_json_and_the_metrics():
    records = FakeRecords()
    dash = Dashboard(Monitor(records), "demo</script><b>")
    fill(records, dash, 3)
    server = DashboardServer(dash, "127.0.0.1", 0).start()
    try:
        page = urllib.request.urlopen(server.url, timeout=10).read().decode()
        state = json.loads(urllib.request.urlopen(server.url + "api/swarm.json", timeout=10).read())
        metrics = urllib.request.urlopen(server.url + "metrics", timeout=10)
        script = urllib.request.urlopen(server.url + "static/uPlot.iife.min.js", timeout=10).read()
    finally:
        server.stop()
    assert set(state) == {"coordinator", "peers", "credit", "validation", "commit_log", "history", "run"}
    assert all(tuple(p) == PEER_KEYS for p in state["peers"])
    # the run id is untrusted text: escaped in the title, and "</" cannot end the inlined JSON early
    assert "demo&lt;/script&gt;&lt;b&gt;" in page and "demo<\\/script><b>" in page
    inlined = page.split('<script id="initial-state" type="application/json">')[1].split("</script>")[0]
    assert json.loads(inlined)["peers"] == state["peers"]
    assert metrics.headers["Content-Type"].startswith("text/plain") and b"heloco_peer_tokens" in metrics.read()
    assert b"uPlot" in script[:2000]


def test_an_evaluator_record_is_charted_once_per_point():
    from heloco_p2p.swarm.records import EvalRecord

    class WithEvals(FakeRecords):
        evals_list: list = []

        def evals(self):
            return list(self.evals_list)

    records = WithEvals()
    dash = Dashboard(Monitor(records), "demo")
    fill(records, dash, 1)
    records.evals_list = [EvalRecord(peer_id="Qme", name="e", version=4, time=NOW + 1, mean=6.0,
                                     losses={"de": 5.5, "fr": 6.5}, history_versions=[2, 4],
                                     history_times=[NOW - 60, NOW + 1], history_means=[6.5, 6.0],
                                     history_losses=[{"de": 6.0, "fr": 7.0}, {"de": 5.5, "fr": 6.5}])]
    dash.poll_once(NOW + 5)
    dash.poll_once(NOW + 10)  # the same record again: no new points
    v = dash.history.export()["validation"]
    assert v["version"] == [2, 4] and v["mean"] == [6.5, 6.0]
    assert v["per_language"] == {"de": [6.0, 5.5], "fr": [7.0, 6.5]}


# ---------------------------------------------------------------------------- a sharded run on the page
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class FixedMonitor:
    """A monitor whose every poll returns the same snapshot (no records behind it)."""

    def __init__(self, snap: dict):
        self.snap, self.lease = snap, None
        self.records = FakeRecords()
        self.records.genesis = lambda: None

    def poll(self, now=None):
        return copy.deepcopy(self.snap)


def sharded_snapshot() -> dict:
    """4 shards: a holds 0 and 2, c holds 1 (standby d), shard 3 has no live lease; phone is a
    --client-mode peer (no address of its own); d's name is markup, shown as text."""
    records = ShardedRecords({1: [claim("c", 3, version=7, standbys=["Qmd"])],
                              2: [claim("a", 2, version=9, standbys=[], commits_per_minute=1.5)], 3: []})
    records.peer_records = [peer("a", role="coordinator", shards={"0": "coordinator", "2": "coordinator"}),
                            peer("b", role="standby", shards={"0": "standby"}),
                            peer("c", role="coordinator", shards={"1": "coordinator", "0": "standby"}),
                            peer("d<i>", peer_id="Qmd", role="standby", shards={"1": "standby"}),
                            peer("phone", client=True, maddrs=[])]
    records.claims = [claim("a", 1)]
    snap = Monitor(records, lease_seconds=10.0, shards=4).poll(NOW)
    snap["shards"][1]["commit_log"] = {"ok": True, "problems": [], "forks": [], "first": 3, "last": 7, "head": "ab" * 32}
    return snap


def serve(snap: dict):
    dash = Dashboard(FixedMonitor(snap), "demo", interval=60.0)
    dash.poll_once(NOW)
    return DashboardServer(dash, "127.0.0.1", 0).start()


def test_the_json_of_a_sharded_run_carries_every_shard_and_the_placement():
    snap = sharded_snapshot()
    server = serve(snap)
    try:
        state = json.loads(urllib.request.urlopen(server.url + "api/swarm.json", timeout=10).read())
    finally:
        server.stop()
    assert state["shards"] == snap["shards"]
    assert [(v["shard"], v["coordinator"] and (v["coordinator"]["peer_id"], v["coordinator"]["term"]))
            for v in state["shards"]] == [(0, ("Qma", 1)), (1, ("Qmc", 3)), (2, ("Qma", 2)), (3, None)]
    assert state["placement"] == {"holders": {"Qma": [0, 2], "Qmc": [1]}, "stacked": {"Qma": [0, 2]},
                                  "fewer_peers": False}
    rows = {p["name"]: p for p in state["peers"]}
    assert rows["phone"]["client"] is True and rows["a"]["client"] is False
    assert rows["c"]["shards"] == {"1": "coordinator", "0": "standby"} and "shards" not in rows["phone"]
    assert state["coordinator"]["peer_id"] == "Qma"  # shard 0's


def dump_dom(url: str) -> str:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--virtual-time-budget=5000", "--window-size=1280,1600", "--dump-dom", url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120).stdout


def table_rows(dom: str, table_id: str) -> list[tuple[dict, list[str]]]:
    """``(attributes of the <tr>, [text of each cell])`` for each body row of table ``table_id``."""
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, dom[:2000]
    rows = []
    for attrs, cells in re.findall(r"<tr([^>]*)>(.*?)</tr>", body.group(1), re.S):
        rows.append((dict(re.findall(r'([a-z-]+)="([^"]*)"', attrs)),
                     [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", cells, re.S)]))
    return rows


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_the_page_shows_one_row_per_shard_the_stacked_holder_and_the_client_peer():
    server = serve(sharded_snapshot())
    try:
        dom = dump_dom(server.url)
    finally:
        server.stop()
    assert 'data-ready="1"' in dom, dom[:2000]
    assert re.search(r'<section id="shards-section" aria-label="shards">', dom)  # shown: no hidden attribute
    shards = table_rows(dom, "shards")
    assert [attrs["data-shard"] for attrs, _ in shards] == ["0", "1", "2", "3"]
    assert [cells[:5] for _, cells in shards[:3]] == [["0", "a", "1", "10", "6.0"], ["1", "c", "3", "7", "6.0"],
                                                      ["2", "a", "2", "9", "1.5"]]
    assert [cells[5] for _, cells in shards[:3]] == ["b", "d<i>", "none"]  # standbys by name; markup stays text
    assert [cells[6] for _, cells in shards] == ["–", "versions 3–7, head abababababab", "–", "–"]
    assert shards[3][1][1] == "no coordinator (election under way?)" and "data-peer-id" not in shards[3][0]
    assert re.search(r'id="coordinator-label">coordinator \(shard 0\)<', dom)
    assert re.search(r'id="coordinator" data-peer-id="Qma">a<', dom)
    warning = re.search(r'<p class="small warning" id="shards-placement">([^<]*)</p>', dom)
    assert warning and warning.group(1) == "a holds shards 0, 2 (a handover to a free standby is due)"
    peers = {attrs["data-peer-id"]: cells for attrs, cells in table_rows(dom, "peers")}
    assert peers["Qmphone"][11] == "none · client" and peers["Qma"][11] == "direct"
    assert peers["Qmc"][2] == "standby (shard 0) · coordinator (shard 1)"
    assert peers["Qma"][2] == "coordinator (shard 0) · coordinator (shard 2)" and peers["Qmphone"][2] == "training"
    assert "<i>" not in dom.split('id="initial-state"')[0]  # no name became an element


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_the_page_of_an_unsharded_run_shows_no_shards_section():
    records = FakeRecords()
    records.peer_records, records.claims = [peer("a", role="coordinator"), peer("b")], [claim("a", 2)]
    server = serve(Monitor(records, lease_seconds=10.0).poll(NOW))
    try:
        dom = dump_dom(server.url)
    finally:
        server.stop()
    assert 'data-ready="1"' in dom, dom[:2000]
    assert re.search(r'<section id="shards-section" aria-label="shards" hidden="">', dom)
    assert table_rows(dom, "shards") == []
    assert re.search(r'<p class="small warning" id="shards-placement" hidden="">\s*</p>', dom)
    assert re.search(r'id="coordinator-label">coordinator<', dom)
    peers = {attrs["data-peer-id"]: cells for attrs, cells in table_rows(dom, "peers")}
    assert set(peers) == {"Qma", "Qmb"} and peers["Qma"][2] == "coordinator" and peers["Qmb"][11] == "direct"
