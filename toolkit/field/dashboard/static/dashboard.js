// fedge dashboard: applies /events to the page. The first event is the whole state,
// then only what changed: device rows by id, and the job's figures when a round closes.
// Text from the fleet goes in with textContent only. window.fedge holds what the tests
// read (rounds seen, and how long after each round's close the page showed it).
"use strict";
(function () {
  const C = {round: 0, acc: 1, loss: 2, rep: 3, asg: 4, up: 5, down: 6, secs: 7, rej: 8, closed: 9};
  const state = {devices: new Map(), rows: new Map(), timeline: [], profiles: {}, summary: {}};
  const fedge = window.fedge = {events: 0, rounds: [], latency: [], state: state};
  const $ = (id) => document.getElementById(id);
  const charts = {};
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
    "#db2777"];

  function text(el, v) { if (el.textContent !== v) el.textContent = v; }
  function fmtBytes(n) {
    const u = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
    return n.toFixed(i ? 1 : 0) + " " + u[i];
  }
  function fmtTime(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "-"; }
  function num(v, d) { return v === null || v === undefined || v < 0 ? "-" : v.toFixed(d); }

  function width(el) { return Math.max(300, el.parentElement.clientWidth - 16); }

  function chart(id, series, scales, axes) {
    const el = $(id);
    if (charts[id]) { charts[id].destroy(); }
    const opts = {width: width(el), height: 200, scales: Object.assign({x: {time: false}}, scales),
      series: [{label: "round"}].concat(series),
      axes: [{label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]}].concat(axes),
      legend: {live: false}};
    const empty = [[]].concat(series.map(() => []));
    charts[id] = new uPlot(opts, empty, el);
    return charts[id];
  }

  function line(label, color, scale, extra) {
    return Object.assign({label: label, stroke: color, width: 2, scale: scale,
      points: {show: true, size: 5}}, extra || {});
  }

  function makeCharts() {
    chart("chart-acc", [line("accuracy", COLORS[0], "acc"), line("loss", COLORS[1], "loss")],
      {acc: {range: [0, 1]}, loss: {}}, [{scale: "acc", label: "accuracy"},
        {scale: "loss", side: 1, label: "loss", grid: {show: false}}]);
    chart("chart-devices", [line("reporting", COLORS[2], "n"), line("assigned", COLORS[0], "n",
      {dash: [6, 4]})], {n: {}}, [{scale: "n", label: "devices"}]);
    chart("chart-bytes", [line("up", COLORS[3], "b"), line("down", COLORS[4], "b")], {b: {}},
      [{scale: "b", label: "bytes", values: (u, v) => v.map(fmtBytes), size: 70}]);
    chart("chart-time", [line("seconds", COLORS[5], "s"), line("rejected", COLORS[1], "r")],
      {s: {}, r: {}}, [{scale: "s", label: "seconds"},
        {scale: "r", side: 1, label: "rejected", grid: {show: false}}]);
  }

  function drawTimeline() {
    const t = state.timeline;
    const col = (c) => t.map((r) => r[c]);
    const nul = (c) => t.map((r) => (r[c] < 0 ? null : r[c]));
    const rounds = col(C.round);
    const rejected = t.map((r, i) => (i ? Math.max(0, r[C.rej] - t[i - 1][C.rej]) : r[C.rej]));
    charts["chart-acc"].setData([rounds, nul(C.acc), nul(C.loss)]);
    charts["chart-devices"].setData([rounds, col(C.rep), col(C.asg)]);
    charts["chart-bytes"].setData([rounds, col(C.up), col(C.down)]);
    charts["chart-time"].setData([rounds, col(C.secs), rejected]);
  }

  function drawProfiles() {
    const names = Object.keys(state.profiles).sort();
    const anyAcc = names.some((n) => state.profiles[n].some((p) => p[1].accuracy >= 0));
    const key = anyAcc ? "accuracy" : "loss";
    text($("profile-what"), anyAcc ? "(accuracy on the devices)" : "(training loss)");
    const sig = key + "|" + names.join(",");
    if (charts._profiles !== sig) {
      chart("chart-profiles", names.map((n, i) => line(n, COLORS[i % COLORS.length], "y")),
        {y: {}}, [{scale: "y", label: key}]);
      charts._profiles = sig;
    }
    const rounds = [...new Set(names.flatMap((n) => state.profiles[n].map((p) => p[0])))]
      .sort((a, b) => a - b);
    const data = [rounds].concat(names.map((n) => {
      const m = new Map(state.profiles[n].map((p) => [p[0], p[1][key]]));
      return rounds.map((r) => (m.has(r) && m.get(r) >= 0 ? m.get(r) : null));
    }));
    charts["chart-profiles"].setData(data);
  }

  function deviceRow(d) {
    let tr = state.rows.get(d.device);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.device = d.device;
      for (let i = 0; i < 9; i++) tr.appendChild(document.createElement("td"));
      state.rows.set(d.device, tr);
      state.unsorted = true;  // placed once per event (a thousand new rows: one sort)
    }
    const c = tr.cells;
    const online = d.state === "offline" ? "offline" : "online";
    text(c[0], d.device); text(c[1], d.profile || "-");
    text(c[2], online); c[2].className = "online-cell " + online;
    text(c[3], fmtTime(d.seen)); text(c[4], d.fedge || "-");
    text(c[5], d.artifact === "" ? "-" : String(d.artifact)); text(c[6], d.provider || "-");
    text(c[7], d.state + (d.round ? " · round " + d.round : ""));
    text(c[8], d.error || ""); c[8].className = "errtext";
    tr.className = d.state;
  }

  function drawTables() {
    const profiles = {};
    for (const d of state.devices.values()) {
      const p = profiles[d.profile || "?"] = profiles[d.profile || "?"] || {n: 0, on: 0};
      p.n++; if (d.state === "online") p.on++;
    }
    const last = state.summary.profiles || {};
    const pb = $("profiles").tBodies[0];
    pb.replaceChildren(...Object.keys(profiles).sort().map((name) => {
      const f = last[name] || {};
      return cells([name, profiles[name].n, profiles[name].on, f.devices ?? "-",
        num(f.loss, 4), num(f.accuracy, 4)]);
    }));
    const reasons = state.summary.rejected_by_reason || {};
    $("reasons").tBodies[0].replaceChildren(...Object.keys(reasons).sort().map(
      (r) => cells([r, reasons[r]])));
  }

  function cells(values) {
    const tr = document.createElement("tr");
    for (const v of values) {
      const td = document.createElement("td"); td.textContent = String(v); tr.appendChild(td);
    }
    return tr;
  }

  // The newest rollout (fedge rollout's signed report): its stage, each device's report.
  function drawRollout(r) {
    fedge.rollout = r;
    $("rollout").hidden = false;
    text($("rollout-what"), r.rollout + " · version " + r.version + " · updated " +
      fmtTime(r.updated));
    let stage = r.stage + (r.reason ? ": " + r.reason : "");
    if (r.stage === "canary" && r.hold_from) {
      stage += " · judged at " + fmtTime(r.hold_from + r.hold);
    }
    if (r.omitted) stage += " · " + r.omitted + " healthy devices not listed";
    text($("rollout-stage"), stage);
    $("rollout-stage").className = "stage " + r.stage;
    const rows = [];
    for (const [group, ids] of [["canary", r.canary], ["rest", r.rest]]) {
      for (const d of ids) {
        const rep = r.devices[d];
        if (!rep && r.omitted) continue;  // a healthy report left out of a big fleet
        const result = !rep ? "waiting" : (rep.ok ? "ok" : "failed");
        const tr = cells([group, d, "v" + (r.previous[d] ?? "?"),
          rep && rep.artifact_version !== null ? "v" + rep.artifact_version : "-",
          rep ? rep.action : "-", result,
          rep && rep.latency_ms !== null ? num(rep.latency_ms, 3) + " / " +
            num(rep.previous_latency_ms ?? -1, 3) : "-", rep ? rep.error : ""]);
        tr.dataset.device = d;
        tr.cells[5].className = result === "failed" ? "failed" : (result === "ok" ? "ok" : "");
        tr.cells[7].className = "errtext";
        rows.push(tr);
      }
    }
    $("rollout-devices").tBodies[0].replaceChildren(...rows);
    $("rollout-history").replaceChildren(...r.history.map((h) => {
      const li = document.createElement("li");
      li.textContent = fmtTime(h[0]) + " " + h[1] + (h[2] ? " · " + h[2] : "");
      return li;
    }));
  }

  function drawCards(data) {
    const s = state.summary;
    let on = 0;
    for (const d of state.devices.values()) if (d.state === "online") on++;
    text($("online"), on + " / " + state.devices.size);
    text($("fleet-count"), state.devices.size + " devices, " + on + " online");
    if (data.plan && data.plan.strategy) {
      text($("job"), data.job + " · " + data.plan.strategy + " · " + data.plan.codec);
    } else if (data.job) { text($("job"), data.job); }
    if (s.round) {
      text($("round"), s.round + " / " + s.rounds);
      text($("accuracy"), num(s.accuracy, 4));
      text($("reporting"), s.devices_reporting + " / " + s.devices_assigned);
      text($("rejected"), String(s.rejected_total));
      text($("aggregator"), s.cpu_seconds.toFixed(1) + " s / " + fmtBytes(s.rss_bytes));
    }
    text($("refused"), String(Object.values(data.refused || {}).reduce((a, b) => a + b, 0)));
  }

  function apply(data) {
    fedge.events++;
    for (const d of data.devices || []) { state.devices.set(d.device, d); deviceRow(d); }
    if (state.unsorted) {
      const body = $("fleet").tBodies[0];
      const names = [...state.rows.keys()].sort((a, b) => a.localeCompare(b, "en",
        {numeric: true}));
      body.replaceChildren(...names.map((n) => state.rows.get(n)));
      state.unsorted = false;
    }
    let closed = null;
    if (data.timeline) {
      const before = state.summary.round || 0;
      state.timeline = data.timeline;
      state.summary = data.summary || {};
      state.profiles = data.profiles || {};
      // A round closed while the page was open (the first event is the state so far).
      if (state.summary.round && state.summary.round !== before && fedge.events > 1) {
        closed = state.summary;
      }
      drawTimeline();
      drawProfiles();
      if (data.rollout && data.rollout.rollout) drawRollout(data.rollout);
    }
    drawCards(data);
    fedge.rounds = state.timeline.map((r) => r[C.round]);
    if (!closed) { drawTables(); return; }
    // The reporting devices' rows (last seen, round) after the figures are painted: a
    // thousand rows are a few frames' work, done in slices so the charts are not held up.
    const ids = closed.reporting || [];
    const slice = (i) => {
      for (const id of ids.slice(i, i + 250)) {
        const d = state.devices.get(id);
        if (d) { d.seen = Math.max(d.seen || 0, closed.closed); d.round = closed.round; deviceRow(d); }
      }
      if (i + 250 < ids.length) setTimeout(() => slice(i + 250), 0); else drawTables();
    };
    requestAnimationFrame(() => setTimeout(() => {
      const secs = Date.now() / 1000 - closed.closed;
      fedge.latency.push({round: closed.round, seconds: secs});
      text($("latency"), secs.toFixed(2) + " s (round " + closed.round + ")");
      slice(0);
    }, 0));
  }

  function connect() {
    const es = new EventSource("/events");
    es.addEventListener("update", (e) => apply(JSON.parse(e.data)));
    es.onopen = () => { text($("conn"), "live"); $("conn").className = "conn live"; };
    es.onerror = () => { text($("conn"), "reconnecting…"); $("conn").className = "conn down"; };
  }

  makeCharts();
  window.addEventListener("resize", () => {
    for (const [id, c] of Object.entries(charts)) {
      if (c && c.setSize) c.setSize({width: width($(id)), height: 200});
    }
  });
  connect();
})();
