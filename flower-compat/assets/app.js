// celeriac flower dashboard: plain JS, no external assets (uPlot, vendored, draws the charts). Polls the
// API once a second so workers and task states update live without a reload.
(function () {
  "use strict";
  const prefix = document.body.dataset.prefix || "";
  const api = (path) => fetch(prefix + path, { credentials: "same-origin" }).then((r) => {
    if (!r.ok) throw new Error(r.status + " " + path);
    return r.json();
  });
  const $ = (sel) => document.querySelector(sel);
  const esc = (v) => String(v == null ? "" : v).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const time = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
  const badge = (s, cls) => `<span class="badge ${esc(cls || s)}">${esc(s)}</span>`;
  let page = 0;
  const pageSize = 50;
  let knownTypes = "";

  function route() {
    const h = location.hash || "#/workers";
    const [, view, arg] = h.split("/");
    document.querySelectorAll(".view").forEach((v) => v.classList.remove("shown"));
    document.querySelectorAll("nav a").forEach((a) => a.classList.remove("active"));
    const name = ["workers", "tasks", "queues", "task", "charts", "run"].includes(view) ? view : "workers";
    $("#view-" + name).classList.add("shown");
    const nav = $("#nav-" + (name === "task" || name === "run" ? "tasks" : name));
    if (nav) nav.classList.add("active");
    return { view: name, arg: arg ? decodeURIComponent(arg) : null };
  }

  async function workers() {
    const o = await api("/api/celeriac/overview");
    const online = o.workers.filter((w) => w.online).length;
    const st = o.tasks.states || {};
    $("#summary").innerHTML = [
      ["Workers online", `${online} / ${o.workers.length}`],
      ["Tasks", o.tasks.total],
      ["Running", st.STARTED || 0],
      ["Succeeded", st.SUCCESS || 0],
      ["Failed", st.FAILURE || 0],
    ].map(([k, v]) => `<div class="card">${esc(k)}<b>${esc(v)}</b></div>`).join("");
    $("#workers tbody").innerHTML = o.workers.map((w) => `<tr data-worker="${esc(w.hostname)}">
      <td class="mono">${esc(w.hostname)}</td>
      <td>${w.online ? badge("Online", "online") : badge("Offline", "offline")}</td>
      <td>${esc(w.active)}</td><td>${esc(w.processed)}</td><td>${esc(w.concurrency)}</td>
      <td>${esc((w.queues || []).join(", "))}</td><td>${esc((w.loadavg || []).join(" "))}</td>
      <td>${esc(w.sw_ident)} ${esc(w.sw_ver)}</td></tr>`).join("") ||
      `<tr><td colspan="8" class="muted">No workers seen yet (start workers with -E).</td></tr>`;
    knownTaskTypes = o.task_types || [];
    const types = (o.task_types || []).join("|");
    if (types !== knownTypes) {
      knownTypes = types;
      const sel = $("#filters select[name=taskname]");
      const cur = sel.value;
      sel.innerHTML = `<option value="">All tasks</option>` + o.task_types.map((t) => `<option>${esc(t)}</option>`).join("");
      sel.value = cur;
    }
    return o;
  }

  async function tasks() {
    const f = new FormData($("#filters"));
    const q = new URLSearchParams({ limit: pageSize, offset: page * pageSize });
    for (const [k, v] of f.entries()) if (v) q.set(k, v);
    const r = await api("/api/celeriac/tasks?" + q.toString());
    $("#task-count").textContent = `${r.filtered} matching of ${r.total} tasks`;
    $("#page").textContent = `page ${page + 1}`;
    $("#tasks tbody").innerHTML = r.tasks.map((t) => {
      const d = t.dagster || {};
      const run = d.run_id ? `<a class="run-link" href="#/run/${encodeURIComponent(d.run_id)}" title="timeline of the run">${esc(d.run_id.slice(0, 8))}</a>` +
        (d.url ? ` <a href="${esc(d.url)}" target="_blank" rel="noopener" title="in Dagster">↗</a>` : "") : "";
      return `<tr data-task="${esc(t.uuid)}" data-state="${esc(t.state)}">
        <td class="mono"><a href="#/task/${encodeURIComponent(t.uuid)}">${esc(t.uuid)}</a></td>
        <td>${esc(t.name)}</td><td>${badge(t.state)}</td><td class="mono">${esc(t.worker)}</td>
        <td>${esc(time(t.received))}</td><td>${t.runtime != null ? esc(Number(t.runtime).toFixed(3)) + " s" : ""}</td>
        <td class="mono">${run}${d.job ? " " + esc(d.job) : ""}</td><td>${esc(d.step_key)}</td></tr>`;
    }).join("") || `<tr><td colspan="8" class="muted">No tasks.</td></tr>`;
  }

  async function queues() {
    const r = await api("/api/queues/detail");
    $("#queues tbody").innerHTML = r.map((q) => `<tr data-queue="${esc(q.name)}"><td class="mono">${esc(q.name)}</td>
      <td>${esc(q.ready)}</td><td>${esc(q.reserved)}</td><td>${esc(q.running)}</td>
      <td>${q.priorities ? Object.entries(q.priorities).map(([p, n]) => `${esc(p)}: ${esc(n)}`).join(", ") : ""}</td></tr>`).join("");
  }

  async function task(id) {
    const t = await api("/api/celeriac/task/" + encodeURIComponent(id));
    $("#task-title").innerHTML = `${esc(t.name || "task")} <span class="mono">${esc(t.uuid)}</span> ${badge(t.state)}`;
    const d = t.dagster;
    $("#task-dagster").innerHTML = d ? [
      ["Dagster run", (d.url ? `<a href="${esc(d.url)}" target="_blank" rel="noopener">${esc(d.run_id)}</a>` : esc(d.run_id)) +
        (d.run_id ? ` <a class="run-link" href="#/run/${encodeURIComponent(d.run_id)}">timeline</a>` : "")],
      ["Job", esc(d.job)], ["Step", esc(d.step_key)], ["Kubernetes Job", esc(d.k8s_job)],
    ].map(([k, v]) => `<div class="card">${k}<b class="mono">${v || ""}</b></div>`).join("") : "";
    const rows = Object.entries(t).filter(([k]) => k !== "dagster").map(([k, v]) => {
      let val = v;
      if (["received", "sent", "started", "succeeded", "failed", "retried", "revoked", "rejected", "timestamp"].includes(k) && v) val = `${time(v)} (${v})`;
      else if (typeof v === "object" && v !== null) val = JSON.stringify(v);
      return `<tr><th>${esc(k)}</th><td class="mono"><pre>${esc(val)}</pre></td></tr>`;
    });
    $("#task-fields tbody").innerHTML = rows.join("");
  }


  // ---- Charts (uPlot). Series come from /api/celeriac/series/*; the instances are kept in
  // window.celeriacCharts so a test (or a curious operator) can read what is drawn.
  const charts = {};
  window.celeriacCharts = charts;
  const palette = ["#4493f8", "#d29922", "#a371f7", "#39c5cf", "#db61a2", "#e3823b", "#8b949e", "#57ab5a"];
  const OK = "#2ea043", BAD = "#e5534b";
  const css = (name) => getComputedStyle(document.body).getPropertyValue(name).trim();
  let knownTaskTypes = [];

  function axes(unit) {
    const stroke = css("--fg"), grid = { stroke: css("--line"), width: 1 };
    return [
      { stroke, grid, ticks: grid },
      { stroke, grid, ticks: grid, size: 56, values: (u, vals) => vals.map((v) => v == null ? "" : (+v.toFixed(3)) + (unit || "")) },
    ];
  }

  function draw(name, data, series, unit) {
    const fig = document.getElementById("chart-" + name);
    const box = fig.querySelector(".plot");
    const key = series.map((s) => s.label).join("|") + "|" + document.body.dataset.scheme;
    const width = Math.max(320, box.clientWidth || fig.clientWidth || 600);
    let c = charts[name];
    if (c && c.__key === key) {
      c.setData(data);
      if (Math.abs(c.width - width) > 4) c.setSize({ width, height: 220 });
      return c;
    }
    if (c) c.destroy();
    box.textContent = "";
    c = new uPlot({
      width, height: 220,
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(hi || 0, unit === "" ? 1 : 0.001) * 1.1] } },
      axes: axes(unit),
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [{ label: "time" }].concat(series),
    }, data, box);
    c.__key = key;
    charts[name] = c;
    return c;
  }

  function line(label, i, extra) {
    return Object.assign({ label, stroke: palette[i % palette.length], width: 2, spanGaps: false, points: { show: false } }, extra || {});
  }

  async function chartsView() {
    const w = $("#chart-window").value;
    const runtimeOf = knownTaskTypes.includes("execute_step_k8s_job") ? "&taskname=execute_step_k8s_job" : "";
    const [ts, qs] = await Promise.all([
      api(`/api/celeriac/series/tasks?window=${encodeURIComponent(w)}${runtimeOf}`),
      api(`/api/celeriac/series/queues?window=${encodeURIComponent(w)}`),
    ]);
    draw("tasks", [ts.t, ts.succeeded, ts.failed], [
      line("succeeded/s", 0, { stroke: OK }), line("failed/s", 1, { stroke: BAD }),
    ], "/s");
    const depth = [qs.t], depthSeries = [], inflight = [qs.t], inflightSeries = [];
    qs.queues.forEach((q, i) => {
      const pri = q.priorities || {};
      const steps = Object.keys(pri);
      if (steps.length) {
        steps.forEach((p, j) => {
          depth.push(pri[p]);
          depthSeries.push(line(`${q.queue} · priority ${p}`, i * steps.length + j));
        });
      } else {
        depth.push(q.ready);
        depthSeries.push(line(q.queue, i));
      }
      inflight.push(q.running, q.limit);
      inflightSeries.push(line(`${q.queue} running`, i), line(`${q.queue} limit`, i, { dash: [6, 4], width: 1.5 }));
    });
    draw("depth", depth, depthSeries, "");
    draw("inflight", inflight, inflightSeries, "");
    // Percentiles exist only where tasks finished: join those points and mark them, so a sparse
    // workload still shows a line.
    const pct = { spanGaps: true, points: { show: true, size: 5 } };
    draw("runtime", [ts.t, ts.p50, ts.p90, ts.p99], [line("p50", 0, pct), line("p90", 1, pct), line("p99", 2, pct)], "s");
    $("#chart-note").textContent = `${ts.finished} tasks finished in the window · ${qs.queues.length} queues sampled every ${qs.sample_every} s` +
      (ts.runtime_of ? ` · percentiles of ${ts.runtime_of}` : "");
  }

  // ---- Run timeline: a Gantt of the run's steps, one bar per attempt, from /api/celeriac/runs/<id>/timeline.
  const PHASES = {
    queued: "queue wait (published → received)",
    reserved: "reserved on the worker (received → started)",
    launching: "worker launching (started → Job created)",
    pod_starting: "Job/pod start-up (Job created → step start)",
    running: "step running (step start → step end; coloured by outcome)",
    finishing: "finishing (step end → result stored)",
  };
  let lastTimeline = "";
  const secs = (v) => v == null ? "" : (v < 10 ? v.toFixed(2) : v.toFixed(1)) + " s";

  function bar(track, from, to, lo, span, cls, title) {
    const el = document.createElement("div");
    el.className = "seg " + cls;
    el.style.left = ((from - lo) / span * 100) + "%";
    el.style.width = Math.max(0.25, (to - from) / span * 100) + "%";
    el.title = title;
    track.appendChild(el);
    return el;
  }

  function ganttRow(gantt, label, sub, attrs) {
    const row = document.createElement("div");
    row.className = "g-row";
    for (const [k, v] of Object.entries(attrs)) row.dataset[k] = v;
    const lab = document.createElement("div");
    lab.className = "g-label";
    lab.innerHTML = `<b>${esc(label)}</b><span class="muted">${esc(sub)}</span>`;
    const track = document.createElement("div");
    track.className = "g-track";
    row.append(lab, track);
    gantt.appendChild(row);
    return track;
  }

  async function runView(id) {
    const others = $("#run-others").checked;
    const t = await api(`/api/celeriac/runs/${encodeURIComponent(id)}/timeline` + (others ? "?others=1" : ""));
    const text = JSON.stringify(t);
    if (text === lastTimeline) return;
    lastTimeline = text;
    window.celeriacTimeline = t;
    $("#run-title").innerHTML = `Run <span class="mono">${esc(t.run_id)}</span> ${t.job ? esc(t.job) : ""}`;
    const attempts = t.steps.reduce((n, s) => n + s.attempts.length, 0);
    $("#run-meta").textContent = `${t.steps.length} steps, ${attempts} attempts` +
      (t.start != null ? ` · ${secs(t.end - t.start)} from first publish to last result` : "") +
      (t.event_log ? " · Job and step edges from the Dagster event log" : " · Celery events only" + (t.event_log_error ? ` (event log: ${t.event_log_error})` : " (start flower with --dagster-db for Job and step edges)"));
    $("#run-legend").innerHTML = Object.entries(PHASES).map(([p, d]) => `<span class="key"><i class="seg ${p}"></i>${esc(d)}</span>`).join("") +
      ["success", "failure", "retry", "running"].map((o) => `<span class="key"><i class="seg running ${o}"></i>${o}</span>`).join("");
    const gantt = $("#gantt");
    gantt.textContent = "";
    const lo = t.start, hi = t.end;
    const span = Math.max(0.001, (hi || 0) - (lo || 0));
    // Time axis: ticks every 1, 2, 5, 10 … seconds so there are 5–10 of them.
    const axis = ganttRow(gantt, "", "", { axis: "1" });
    if (lo != null) {
      const nice = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600];
      const step = nice.find((n) => span / n <= 10) || 3600;
      for (let s = 0; s <= span; s += step) {
        const tick = document.createElement("span");
        tick.className = "tick";
        tick.style.left = (s / span * 100) + "%";
        tick.textContent = `+${+s.toFixed(1)} s`;
        axis.appendChild(tick);
      }
    }
    for (const step of t.steps) {
      for (const a of step.attempts) {
        const track = ganttRow(gantt, step.step_key + (step.attempts.length > 1 ? ` #${a.attempt}` : ""),
          `${a.worker || "?"} · ${a.queue || "?"}`,
          { step: step.step_key, attempt: String(a.attempt), outcome: a.outcome, queueWait: a.queue_wait == null ? "" : String(a.queue_wait), task: a.task_id || "" });
        for (const sg of a.segments) {
          const cls = sg.phase + (sg.phase === "running" ? " " + a.outcome : "");
          bar(track, sg.from, sg.to, lo, span, cls, `${step.step_key} #${a.attempt}: ${PHASES[sg.phase]} ${secs(sg.to - sg.from)} on ${a.worker || "?"} (${a.queue || "?"})`);
        }
        if (!a.segments.length && a.started != null) bar(track, a.started, hi, lo, span, "running running", "running");
      }
    }
    if (t.others && t.others.length) {
      const sep = document.createElement("div");
      sep.className = "g-sep muted";
      sep.textContent = `Steps and tasks of other runs on the same workers meanwhile (${t.others.length})`;
      gantt.appendChild(sep);
      for (const o of t.others) {
        const track = ganttRow(gantt, o.step_key || o.name || o.task_id, `${o.run_id ? o.run_id.slice(0, 8) + " · " : ""}${o.worker || "?"} · ${o.queue || "?"}`, { other: o.task_id });
        const from = Math.max(lo, o.started), to = Math.min(hi, o.finished == null ? hi : o.finished);
        bar(track, from, Math.max(from, to), lo, span, "other", `${o.name} ${o.task_id} (${o.state})`);
      }
    }
    $("#run-table tbody").innerHTML = t.steps.flatMap((s) => s.attempts.map((a) => {
      const d = (x, y) => (x != null && y != null ? secs(y - x) : "");
      return `<tr data-step="${esc(s.step_key)}" data-attempt="${a.attempt}"><td class="mono">${esc(s.step_key)}</td><td>${a.attempt}</td>
        <td>${badge(a.outcome, "o-" + a.outcome)}</td><td class="mono">${a.task_id ? `<a href="#/task/${encodeURIComponent(a.task_id)}">${esc(a.worker || "?")}</a>` : esc(a.worker)}</td>
        <td class="mono">${esc(a.queue)}</td><td>${secs(a.queue_wait)}</td><td>${d(a.job_created, a.step_start)}</td>
        <td>${d(a.step_start, a.step_end)}</td><td>${d(a.published, a.result_stored)}</td></tr>`;
    })).join("");
  }

  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    const r = route();
    try {
      if (r.view === "workers") await workers();
      else if (r.view === "tasks") { await tasks(); }
      else if (r.view === "queues") await queues();
      else if (r.view === "task" && r.arg) await task(r.arg);
      else if (r.view === "charts") await chartsView();
      else if (r.view === "run" && r.arg) await runView(r.arg);
      $("#status").textContent = "live · updated " + new Date().toLocaleTimeString();
    } catch (e) {
      $("#status").textContent = "error: " + e.message;
    } finally {
      busy = false;
    }
  }

  $("#filters").addEventListener("input", () => { page = 0; refresh(); });
  $("#filters").addEventListener("submit", (e) => e.preventDefault());
  $("#prev").addEventListener("click", () => { page = Math.max(0, page - 1); refresh(); });
  $("#next").addEventListener("click", () => { page += 1; refresh(); });
  window.addEventListener("hashchange", () => { lastTimeline = ""; refresh(); });
  $("#chart-window").addEventListener("change", refresh);
  $("#run-others").addEventListener("change", () => { lastTimeline = ""; refresh(); });
  // Colours follow the system's light/dark setting; the charts are redrawn when it changes.
  const dark = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  const scheme = () => { document.body.dataset.scheme = dark && dark.matches ? "dark" : "light"; };
  scheme();
  if (dark && dark.addEventListener) dark.addEventListener("change", () => { scheme(); refresh(); });
  window.addEventListener("resize", () => { if (route().view === "charts") refresh(); });
  refresh();
  setInterval(refresh, 1000);
  // The worker summary feeds the task-name filter; keep it fresh from any view.
  setInterval(() => { if (route().view !== "workers") workers().catch(() => {}); }, 5000);
})();
