"""The dashboard without a swarm: its history, its Prometheus series and its HTTP routes, over
hand-made records (tests/test_watch_swarm.py runs it against real peers and a browser)."""
import json
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_monitor import NOW, FakeRecords, claim, peer  # the monitor tests' record builders

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
