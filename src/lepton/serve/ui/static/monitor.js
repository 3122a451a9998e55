"use strict";
// Monitor: the server's own metrics (GET /v1/monitor: the last hour, one point per sample) refreshed every
// REFRESH_MS; charts are SVG drawn here, no library.
const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const CHARTS = [
  ["rate", "Requests/s"], ["p50_ms", "p50 latency (ms)"], ["p99_ms", "p99 latency (ms)"],
  ["mean_batch", "Mean batch size"], ["queue", "Queue depth"], ["drift", "Input drift (SD)"],
];

document.addEventListener("DOMContentLoaded", async () => {
  const { api, el, fmt, showError } = Lepton;

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  function chart(points, field, title) {
    const values = points.map((p) => p[field]).filter((v) => typeof v === "number" && isFinite(v));
    const w = 320, h = 90;
    const box = svg("svg", { viewBox: "0 0 " + w + " " + h, role: "img", "aria-label": title });
    box.append(svg("rect", { x: 0, y: 0, width: w, height: h, class: "plot" }));
    if (values.length) {
      const max = Math.max(...values, 1e-9);
      const t0 = points[0].t, t1 = points[points.length - 1].t;
      const span = Math.max(t1 - t0, 1e-9);
      const xy = points.filter((p) => typeof p[field] === "number" && isFinite(p[field]))
        .map((p) => [((p.t - t0) / span) * (w - 8) + 4, h - 6 - (p[field] / max) * (h - 20)]);
      box.append(svg("polyline", { points: xy.map((q) => q.join(",")).join(" "), class: "line" }));
      for (const [x, y] of xy) box.append(svg("circle", { cx: x, cy: y, r: 2.5, class: "dot" }));
      const label = svg("text", { x: 6, y: 14, class: "axis" });
      label.textContent = "max " + fmt(max, 2);
      box.append(label);
    }
    return el("figure", { class: "chart", "data-field": field }, box, el("figcaption", { text: title }));
  }

  async function refresh() {
    let m;
    try {
      m = await api("/v1/monitor");
      showError("");
    } catch (err) {
      showError(err.message);
      return;
    }
    const last = m.points.length ? m.points[m.points.length - 1] : {};
    const set = (id, text) => { document.getElementById(id).textContent = text; };
    set("requests-total", String(Math.round(m.requests_total)));
    set("errors-total", String(Math.round(m.errors_total)));
    set("rate", fmt(last.rate, 2));
    set("p50", fmt(last.p50_ms, 1));
    set("p99", fmt(last.p99_ms, 1));
    set("batch", fmt(last.mean_batch, 2));
    set("queue", String(Math.round(m.queue)));
    const drifts = Object.values(m.drift);
    set("drift", drifts.length ? fmt(Math.max(...drifts), 2) : "–");
    set("updated", "updated " + new Date().toLocaleTimeString());
    set("window", "(" + Math.round(m.window_seconds / 60) + " min of samples every " + m.sample_seconds + " s)");
    document.getElementById("charts").replaceChildren(...CHARTS.map(([f, t]) => chart(m.points, f, t)));
    const total = Object.values(m.predictions).reduce((a, b) => a + b, 0);
    document.querySelector("#classes tbody").replaceChildren(...Object.entries(m.predictions).map(([label, n]) =>
      el("tr", {}, el("td", { text: label }), el("td", { text: String(Math.round(n)) }),
        el("td", { text: total ? fmt((100 * n) / total, 1) + " %" : "–" }))));
  }

  try {
    await Lepton.start();
  } catch (err) {
    showError(err.message);
    return;
  }
  await refresh();
  setInterval(refresh, REFRESH_MS);
});
