// heloco-p2p dashboard: renders /api/swarm.json (the state is inlined in the page for the first
// paint) and fetches it again every few seconds. Peer names are untrusted: only textContent.
"use strict";

const PALETTE = ["#0b7285", "#e8590c", "#5f3dc4", "#2b8a3e", "#c2255c", "#1864ab", "#e67700", "#495057",
                 "#087f5b", "#a61e4d", "#364fc7", "#5c940d"];
const CHART_HEIGHT = 220;
const charts = {};  // id -> {plot, keys}
const colors = {};  // series name -> colour, the same in every chart (a language, a peer)

function colorOf(key) {
  if (key === "mean") return "#1d1d1f";
  if (!(key in colors)) colors[key] = PALETTE[Object.keys(colors).length % PALETTE.length];
  return colors[key];
}

function count(n) {
  for (const [u, s] of [["G", 1e9], ["M", 1e6], ["k", 1e3]]) if (Math.abs(n) >= s) return +(n / s).toFixed(1) + u;
  return String(Math.round(n));
}
function bytes(n) {
  for (const [u, s] of [["G", 2 ** 30], ["M", 2 ** 20], ["K", 2 ** 10]]) if (n >= s) return (n / s).toFixed(1) + u;
  return n + "B";
}
function age(seconds) {
  seconds = Math.max(0, seconds);
  if (seconds < 120) return seconds.toFixed(0) + " s";
  if (seconds < 7200) return (seconds / 60).toFixed(0) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}
function fixed(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

// peer id -> the name shown (the same rule as the terminal monitor: a shared name gets its id's tail)
function displayNames(peers) {
  const taken = {};
  for (const p of peers) taken[p.name] = (taken[p.name] || 0) + 1;
  const out = {};
  for (const p of peers) out[p.peer_id] = p.name && taken[p.name] === 1 ? p.name : p.name + "~" + p.peer_id.slice(-6);
  return out;
}

function setText(id, text) { document.getElementById(id).textContent = text; }

// a sharded run (swarm.shards > 1): the snapshot has one view per shard, shard 0 first
function isSharded(state) { return Array.isArray(state.shards) && state.shards.length > 1; }

function renderSummary(state, names) {
  const c = state.coordinator;
  const alive = state.peers.filter(p => p.alive).length;
  setText("coordinator-label", isSharded(state) ? "coordinator (shard 0)" : "coordinator");
  setText("coordinator", c ? (names[c.peer_id] || c.peer_id.slice(-8)) : "none (election?)");
  document.getElementById("coordinator").dataset.peerId = c ? c.peer_id : "";
  setText("term", c ? String(c.term) : "–");
  setText("version", c ? String(c.version) : "–");
  setText("commits-per-min", c ? c.commits_per_min.toFixed(1) : "–");
  setText("standbys", c ? (c.standbys.map(s => names[s] || s.slice(-8)).join(", ") || "none") : "–");
  setText("peers-alive", `${alive} of ${state.peers.length}`);
  const tokens = state.history.run_tokens.filter(x => x !== null);
  setText("run-tokens", tokens.length ? count(tokens[tokens.length - 1]) : "–");
  const run = state.run;
  const status = document.getElementById("status");
  const when = run.polled_at ? new Date(run.polled_at * 1000).toLocaleTimeString() : "never";
  status.textContent = (run.error ? run.error + " · " : "") + `records read ${when}`;
  status.className = run.error ? "error" : "muted";
}

// One table row's cells: [text, class] pairs (text content only: names are untrusted).
function appendCells(tr, cells) {
  for (const [text, cls] of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
}

// The role cell: the peer's role, or (an alive peer of a sharded run) its role in each shard it
// coordinates or stands by for, e.g. "coordinator (shard 1) · standby (shard 0)".
function roleCell(p, role) {
  const shards = p.alive && p.shards ? Object.entries(p.shards).sort((x, y) => Number(x[0]) - Number(y[0])) : [];
  if (!shards.length) return [role, "role-" + role];
  const coordinates = shards.some(([, r]) => r === "coordinator");
  return [shards.map(([k, r]) => `${r} (shard ${k})`).join(" · "), coordinates ? "role-coordinator" : "role-" + role];
}

// commit log head of one shard, as the terminal monitor words it
function commitLogText(log) {
  if (!log) return "–";
  if (log.forks.length) {
    const f = log.forks[0];
    return `FORK at version ${f.version} (terms ${f.terms.join(", ")}): ${log.forks.length} versions differ`;
  }
  if (log.problems.length) return "BROKEN: " + log.problems[0];
  return log.head ? `versions ${log.first}–${log.last}, head ${log.head.slice(0, 12)}` : "–";
}

// One row per shard (swarm.shards > 1) and the placement warning; hidden for an unsharded run.
function renderShards(state, names) {
  const sharded = isSharded(state);
  document.getElementById("shards-section").hidden = !sharded;
  const body = document.querySelector("#shards tbody");
  body.replaceChildren();
  const warning = document.getElementById("shards-placement");
  warning.hidden = true;
  warning.textContent = "";
  if (!sharded) return;
  const name = pid => names[pid] || pid.slice(-8);
  for (const view of state.shards) {
    const tr = document.createElement("tr");
    tr.dataset.shard = String(view.shard);
    const c = view.coordinator;
    if (c) {
      tr.dataset.peerId = c.peer_id;
      appendCells(tr, [[String(view.shard), "num"], [name(c.peer_id), "role-coordinator"], [String(c.term), "num"],
        [String(c.version), "num"], [c.commits_per_min.toFixed(1), "num"],
        [c.standbys.map(name).join(", ") || "none", ""], [commitLogText(view.commit_log), ""]]);
    } else {
      tr.className = "no-coordinator";
      appendCells(tr, [[String(view.shard), "num"], ["no coordinator (election under way?)", "role-silent"],
        ["–", "num"], ["–", "num"], ["–", "num"], ["–", ""], [commitLogText(view.commit_log), ""]]);
    }
    body.appendChild(tr);
  }
  const placement = state.placement;
  const stacked = placement ? Object.entries(placement.stacked || {}) : [];
  if (stacked.length) {
    const held = stacked.map(([pid, ks]) => `${name(pid)} holds shards ${ks.join(", ")}`).join("; ");
    const why = placement.fewer_peers ? "fewer peers that accept connections than shards"
                                      : "a handover to a free standby is due";
    warning.textContent = `${held} (${why})`;
    warning.hidden = false;
  }
}

function renderPeers(state, names) {
  const now = state.run.polled_at || Date.now() / 1000;
  const body = document.querySelector("#peers tbody");
  body.replaceChildren();
  for (const p of state.peers) {
    const tr = document.createElement("tr");
    const role = p.role === "left" ? "left" : (p.alive ? p.role : "silent");
    tr.className = "peer " + role;
    tr.dataset.peerId = p.peer_id;
    const reasons = Object.entries(p.rejected).filter(([k]) => k !== "total").map(([k, v]) => `${k} ${v}`).join(", ");
    const cells = [
      [names[p.peer_id], ""], [p.region, ""], roleCell(p, role), [fixed(p.speed, 2), "num"],
      [String(p.inner_steps), "num"],
      [p.staleness_last === null ? "–" : `${p.staleness_last} / ${fixed(p.staleness_mean, 1)}`, "num"],
      [count(p.tokens), "num"], [fixed(p.last_loss, 3), "num"],
      [String(p.rejected.total) + (reasons ? ` (${reasons})` : ""), "num"],
      [`${bytes(p.bytes_in)} / ${bytes(p.bytes_out)}`, "num"], [age(now - p.last_seen) + " ago", "num"],
      [p.reachability + (p.client ? " · client" : ""), ""], [p.device, ""],
    ];
    appendCells(tr, cells);
    body.appendChild(tr);
  }
}

function renderCredit(state, names) {
  const body = document.querySelector("#credit tbody");
  body.replaceChildren();
  const credit = state.credit || {peers: {}, regions: {}};
  const pct = x => (100 * x).toFixed(0) + "%";
  for (const [pid, c] of Object.entries(credit.peers)) {
    const tr = document.createElement("tr");
    tr.dataset.peerId = pid;
    const cells = [[names[pid] || c.name, ""], [c.region, ""], [String(c.commits), "num"], [count(c.tokens), "num"],
      [pct(c.share), "num"], [String(c.rejected), "num"], [fixed(c.cosine_mean, 2), "num"],
      [`${pct(c.kept)} / ${pct(c.rotated)} / ${pct(c.shrunk)}`, "num"], [fixed(c.norm_ratio, 2), "num"]];
    appendCells(tr, cells);
    body.appendChild(tr);
  }
  const regions = Object.entries(credit.regions).map(([r, a]) => `${r} ${pct(a.share)} (${a.commits} commits, ${a.peers} peers)`);
  setText("credit-regions", regions.length ? "By region: " + regions.join(" · ") : "No credit published yet.");
}

// Each chart: a title, the x values (unix seconds) and named y series aligned with them.
function chartSpecs(h) {
  const validation = {mean: h.validation.mean, ...h.validation.per_language};
  return [
    {id: "validation-loss", title: "Validation loss per language and mean", x: h.validation.time, series: validation,
     empty: "No evaluation of the global model yet (an evaluator publishes one every N seconds; the testnet runs one)."},
    {id: "training-loss", title: "Training loss per language (its peers' last rounds)", x: h.time,
     series: h.regions.loss},
    {id: "tokens-peer", title: "Tokens per peer", x: h.time, series: h.peers.tokens},
    {id: "tokens-region", title: "Tokens per language", x: h.time, series: h.regions.tokens},
    {id: "staleness", title: "Mean staleness per peer", x: h.time, series: h.peers.staleness},
    {id: "branches", title: "Correction branches (this term)", x: h.time, series: h.branches,
     empty: "No correction branch counted in this term yet."},
  ];
}

function chartWidth(el) { return Math.max(240, el.clientWidth - 16); }

function renderChart(container, spec) {
  let box = document.getElementById("chart-" + spec.id);
  if (!box) {
    box = document.createElement("div");
    box.className = "chart";
    box.id = "chart-" + spec.id;
    const h3 = document.createElement("h3");
    h3.textContent = spec.title;
    box.appendChild(h3);
    container.appendChild(box);
  }
  const keys = Object.keys(spec.series);
  const data = [spec.x, ...keys.map(k => spec.series[k])];
  const points = data.slice(1).reduce((n, ys) => n + ys.filter(y => y !== null).length, 0);
  box.dataset.points = String(points);
  box.dataset.series = keys.join(",");
  const old = charts[spec.id];
  if (!points || !spec.x.length) {
    if (old) { old.plot.destroy(); delete charts[spec.id]; }
    if (!box.querySelector(".empty")) {
      const p = document.createElement("div");
      p.className = "empty";
      p.textContent = spec.empty || "No data yet.";
      box.appendChild(p);
    }
    return;
  }
  box.querySelector(".empty")?.remove();
  if (old && old.keys === keys.join("\u0000")) {
    old.plot.setData(data);
    return;
  }
  if (old) old.plot.destroy();
  const few = spec.x.length < 3;  // a line needs two points: show dots until there are enough
  const opts = {
    width: chartWidth(box), height: CHART_HEIGHT,
    scales: {x: {time: true}},
    // the mean over languages is drawn dark and dashed, apart from the languages themselves
    series: [{}, ...keys.map(k => ({label: k, stroke: colorOf(k),
                                          dash: k === "mean" ? [6, 4] : undefined, width: 2,
                                          points: {show: few}, spanGaps: false}))],
    // y labels: 12.5k rather than 12,500 (a wide number would be cut at the chart's edge)
    axes: [{}, {size: 52, values: (u, splits) => splits.map(v => v === null ? "" : Math.abs(v) >= 1000 ? count(v)
                                                                       : String(+v.toFixed(3)))}],
  };
  charts[spec.id] = {plot: new uPlot(opts, data, box), keys: keys.join("\u0000")};
}

function render(state) {
  const names = displayNames(state.peers);
  renderSummary(state, names);
  renderShards(state, names);
  renderPeers(state, names);
  renderCredit(state, names);
  const container = document.getElementById("charts");
  for (const spec of chartSpecs(state.history)) renderChart(container, spec);
  const h = state.history;
  setText("charts-note", `${h.time.length} samples kept (at most ${h.max_samples}), one every ${state.run.interval} s.`);
  document.body.dataset.ready = "1";
}

async function refresh() {
  try {
    const response = await fetch("/api/swarm.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (err) {
    const status = document.getElementById("status");
    status.textContent = "dashboard unreachable: " + err.message;
    status.className = "error";
  }
}

const initial = JSON.parse(document.getElementById("initial-state").textContent);
render(initial);
setInterval(refresh, Math.max(1, initial.run.interval) * 1000);
window.addEventListener("resize", () => {
  for (const [id, c] of Object.entries(charts)) {
    c.plot.setSize({width: chartWidth(document.getElementById("chart-" + id)), height: CHART_HEIGHT});
  }
});
