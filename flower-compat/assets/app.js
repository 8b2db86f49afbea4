// celeriac flower dashboard: plain JS, no external assets. Polls the API once a second so workers and
// task states update live without a reload.
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
    const name = ["workers", "tasks", "queues", "task"].includes(view) ? view : "workers";
    $("#view-" + name).classList.add("shown");
    const nav = $("#nav-" + (name === "task" ? "tasks" : name));
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
      const run = d.run_id ? (d.url ? `<a href="${esc(d.url)}" target="_blank" rel="noopener">${esc(d.run_id.slice(0, 8))}</a>` : esc(d.run_id.slice(0, 8))) : "";
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
      ["Dagster run", d.url ? `<a href="${esc(d.url)}" target="_blank" rel="noopener">${esc(d.run_id)}</a>` : esc(d.run_id)],
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
  window.addEventListener("hashchange", refresh);
  refresh();
  setInterval(refresh, 1000);
  // The worker summary feeds the task-name filter; keep it fresh from any view.
  setInterval(() => { if (route().view !== "workers") workers().catch(() => {}); }, 5000);
})();
