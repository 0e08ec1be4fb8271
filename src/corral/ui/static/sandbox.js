// A sandbox's page: the resource charts, and while the sandbox runs, its new events as they are
// stored (server-sent events). Event text comes from the agent: it is only ever set as textContent.
"use strict";
(function () {
  const summary = document.getElementById("summary");
  if (!summary) return;
  const SEVERITIES = ["critical", "high", "medium", "low", "info"];

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // --- charts ---------------------------------------------------------------------------------
  const charts = [];
  const data = JSON.parse(document.getElementById("series-data").textContent);
  function chart(id, values, colour) {
    const box = document.getElementById(id);
    if (!box || typeof uPlot === "undefined") return null;
    const width = Math.max(box.clientWidth || 600, 300);
    const plot = new uPlot({
      width: width, height: 140,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      series: [{}, { label: box.dataset.label, stroke: colour, fill: colour + "22", width: 1.5 }],
      axes: [{ stroke: "#667085", grid: { stroke: "#eaecf0" } }, { stroke: "#667085", grid: { stroke: "#eaecf0" } }],
    }, [data.t, values], box);
    charts.push(plot);
    return plot;
  }
  chart("chart-cpu", data.cpu, "#2e5bba");
  chart("chart-memory", data.memory, "#7f56d9");
  function addSample(s) {
    if (charts.length !== 2) return;
    data.t.push(s.t); data.cpu.push(s.cpu); data.memory.push(s.memory);
    charts[0].setData([data.t, data.cpu]);
    charts[1].setData([data.t, data.memory]);
  }

  // --- live -----------------------------------------------------------------------------------
  if (summary.dataset.live !== "yes") return;
  const id = summary.dataset.sandbox;
  const types = summary.dataset.types ? summary.dataset.types.split(",") : [];
  const timeline = document.getElementById("timeline");
  const alerts = document.getElementById("alerts");
  const liveState = document.getElementById("live-state");
  const count = document.getElementById("event-count");
  const alertCount = document.getElementById("alert-count");
  const verdict = document.getElementById("verdict");
  let last = Number(summary.dataset.after) || 0;

  function row(d) {
    const tr = el("tr", "new t-" + d.type.replace(/\./g, "-") + (d.severity ? " sev-" + d.severity : ""));
    tr.append(el("td", "num", d.seq), el("td", "time", d.time), el("td", "type", d.type), el("td", "mono", d.summary));
    return tr;
  }

  function alertEntry(d) {
    const a = d.alert;
    const details = el("details", "alert sev-" + a.severity);
    details.id = "alert-" + d.seq;
    const s = el("summary");
    s.append(el("span", "badge sev-" + a.severity, a.severity), el("span", "pill cat", a.category),
      el("span", "msg", a.message), el("span", "dim meta", "rule " + a.rule + " · " + a.action + ": " + a.outcome + " · " + d.time));
    details.append(s);
    const ev = el("div", "evidence");
    ev.append(el("p", "full", a.message));
    if (a.trigger.length) {
      ev.append(el("h3", null, "Trigger"));
      const t = el("table", "kv");
      for (const [k, v] of a.trigger) { const tr = el("tr"); tr.append(el("th", null, k), el("td", "mono", v)); t.append(tr); }
      ev.append(t);
    }
    for (const [title, items] of [["Processes", a.processes], ["Connections", a.connections]]) {
      if (!items.length) continue;
      ev.append(el("h3", null, title));
      const ul = el("ul", "mono");
      for (const item of items) ul.append(el("li", null, item));
      ev.append(ul);
    }
    const tags = el("p", "tags");
    for (const t of a.mitre) tags.append(el("span", "tag mitre", "MITRE " + t));
    for (const t of a.owasp) tags.append(el("span", "tag owasp", "OWASP " + t));
    ev.append(tags);
    details.append(ev);
    return details;
  }

  function worse(a, b) {
    if (a === "clean") return b;
    return SEVERITIES.indexOf(a) <= SEVERITIES.indexOf(b) ? a : b;
  }

  // The page was rendered from reads made a moment apart: the stream starts at the sandbox's count
  // as first read, and whatever the page already shows is not added twice.
  const shown = new Set(Array.from(timeline.rows, (tr) => Number(tr.cells[0].textContent)));

  function take(d) {
    if (d.seq <= last) return;
    last = d.seq;
    if (count) count.textContent = String(d.seq);
    if ((!types.length || types.includes(d.type)) && !shown.has(d.seq)) timeline.append(row(d));
    if (d.alert && !document.getElementById("alert-" + d.seq)) {
      const none = document.getElementById("no-alerts");
      if (none) none.remove();
      alerts.append(alertEntry(d));
      alertCount.textContent = String(alerts.querySelectorAll("details.alert").length);
      const v = worse(verdict.dataset.verdict, d.alert.severity);
      verdict.dataset.verdict = v;
      verdict.textContent = v;
      verdict.className = "badge big sev-" + v;
    }
    if (d.sample) addSample(d.sample);
  }

  const source = new EventSource("/sandboxes/" + encodeURIComponent(id) + "/live?after=" + last);
  source.addEventListener("event", (m) => take(JSON.parse(m.data)));
  source.addEventListener("stop", (m) => {
    const d = JSON.parse(m.data);
    if (d.seq) take(d);
    source.close();
    if (liveState) { liveState.textContent = "stopped"; liveState.classList.add("ended"); }
    const state = document.getElementById("state");
    if (state) { state.textContent = "stopped"; state.className = "badge stopped"; }
  });
})();
