"use strict";
// Models: versions with stage and metrics (95 % CIs), the model card as safe HTML, a diff between versions,
// routing; with an admin key promote, roll back and route, each behind a confirmation (the server checks the key
// again). Slide models (run as jobs on the Slides page) are listed beside image models with their format, stages,
// test figures and card, and a link to the Slides page; routing, diffs and stage changes are the image models'.
document.addEventListener("DOMContentLoaded", async () => {
  const { api, el, fmt, showError } = Lepton;
  const models = document.getElementById("model");
  const tbody = document.querySelector("#versions tbody");
  const dialog = document.getElementById("confirm");
  let info = null;
  let slide = false;  // the chosen model is a slide model (GET /v1/slide-models/{name})
  const base = () => (slide ? "/v1/slide-models/" : "/v1/models/") + encodeURIComponent(models.value);

  function confirmAction(text) {
    document.getElementById("confirm-text").textContent = text;
    dialog.returnValue = "";
    dialog.showModal();
    document.getElementById("confirm-cancel").focus();
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    });
  }

  // Validation figures, then each evaluation report's: ACC and AUC with their 95 % bootstrap CIs per rule.
  function metricText(metrics) {
    const parts = [];
    const interval = (ci) => (Array.isArray(ci) ? " [" + fmt(ci[0]) + ", " + fmt(ci[1]) + "]" : "");
    for (const [name, value] of Object.entries(metrics || {})) {
      if (typeof value === "number") parts.push(name + " " + fmt(value));
      else if (name.startsWith("eval/") && value && typeof value === "object") {
        for (const [rule, m] of Object.entries(value)) {
          if (!m || typeof m !== "object" || !("auc" in m)) continue;
          const ci = m.ci95 || {};
          parts.push(value.split + " (" + value.images + " images, " + rule + "): AUC " + fmt(m.auc) +
            interval(ci.auc) + ", ACC " + fmt(m.acc) + interval(ci.acc));
        }
      }
    }
    return parts.join("; ");
  }

  async function act(text, path, options) {
    if (!(await confirmAction(text))) return;
    try {
      await api(path, options);
      await load();
    } catch (err) {
      showError(err.message);
    }
  }

  function versionRow(v) {
    const actions = el("td", { class: "admin-only" });
    for (const stage of ["staging", "production"]) {
      if (v.stage === stage || slide) continue;
      const button = el("button", { type: "button", text: "Promote to " + stage, "data-version": v.version,
        "data-stage": stage });
      button.addEventListener("click", () => act(
        "Promote " + info.name + " version " + v.version + " to " + stage + "? The current " + stage +
        " version is archived.", "/v1/admin/models/" + encodeURIComponent(info.name) + "/promote",
        { method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ version: v.version, stage }) }));
      actions.append(button);
    }
    return el("tr", { "data-version": v.version },
      el("td", { text: String(v.version) + (v.version === info.version ? " (served)" : "") }),
      el("td", { text: v.stage, class: "stage" }), el("td", { text: v.format }),
      el("td", { text: metricText(v.metrics) }), el("td", { text: (v.created_at || "").slice(0, 19) }), actions);
  }

  function fillVersions(select, chosen) {
    select.replaceChildren(...info.versions.map((v) => el("option", { value: v.version, text: String(v.version),
      selected: v.version === chosen })));
  }

  async function showCard(version) {
    const card = await api(base() + "/card?version=" + version);
    // Rendered by the server from Markdown with raw HTML off: any tag a card holds arrives as text.
    document.getElementById("card").innerHTML = card.html;
  }

  async function load() {
    showError("");
    slide = models.selectedOptions[0].dataset.kind === "slide";
    info = await api(base());
    document.getElementById("summary").textContent = slide
      ? info.name + ": slide model (" + info.format + ", " + info.task + "), serving version " + info.version +
        ", labels " + info.labels.join(", ") + ", tiles " + info.tile.size + " px at " + info.tile.mpp + " µm/px"
      : info.name + ": serving version " + info.version + " (" + info.task + ", " + info.platform + ", " +
        info.precision + "), labels " + (info.labels || []).join(", ");
    const link = document.getElementById("slide-link");
    link.hidden = !slide;
    link.querySelector("a").href = "/ui/slides?model=" + encodeURIComponent(info.name);
    for (const id of ["routing-title", "diff-title"]) document.getElementById(id).closest("section").hidden = slide;
    document.getElementById("rollback").parentElement.hidden = slide;
    tbody.replaceChildren(...info.versions.map(versionRow));
    if (slide) {
      fillVersions(document.getElementById("card-version"), info.version);
      await showCard(info.version);
      return;
    }
    const route = info.route ? Object.entries(info.route).map(([v, w]) => "version " + v + ": " + w + " %").join(", ")
      : "all traffic to version " + info.version;
    document.getElementById("route-now").textContent = "Now: " + route +
      (info.shadow ? "; shadow: version " + info.shadow : "");
    fillVersions(document.getElementById("diff-a"), info.versions.length > 1 ? info.versions[1].version : info.version);
    fillVersions(document.getElementById("diff-b"), info.versions[0] ? info.versions[0].version : info.version);
    fillVersions(document.getElementById("card-version"), info.version);
    await showCard(info.version);
  }

  try {
    await Lepton.start();
    const [listed, slides] = await Promise.all([api("/v1/models"), api("/v1/slide-models")]);
    for (const m of listed.models) models.append(el("option", { value: m.name, text: m.name }));
    for (const m of slides.models) {
      models.append(el("option", { value: m.name, "data-kind": "slide", text: m.name + " (slide model)" }));
    }
    if (!models.options.length) { showError("No model this key may see is being served."); return; }
    await load();
  } catch (err) {
    showError(err.message);
    return;
  }

  models.addEventListener("change", () => load().catch((err) => showError(err.message)));
  document.getElementById("card-version").addEventListener("change", (e) =>
    showCard(e.target.value).catch((err) => showError(err.message)));
  document.getElementById("rollback").addEventListener("click", () => act(
    "Roll back " + info.name + ": put the previous production version back?",
    "/v1/admin/models/" + encodeURIComponent(info.name) + "/rollback", { method: "POST" }));
  document.getElementById("route-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const weights = {};
    for (const part of document.getElementById("route-weights").value.split(",")) {
      const [v, w] = part.split("=").map((x) => x.trim());
      if (!v) continue;
      weights[v] = Number(w);
    }
    const shadowText = document.getElementById("route-shadow").value.trim();
    const body = { weights, shadow: shadowText ? Number(shadowText) : null };
    act("Route " + info.name + " traffic as " + JSON.stringify(weights) + (shadowText ? ", shadow " + shadowText : "") +
      "?", "/v1/admin/models/" + encodeURIComponent(info.name) + "/route",
    { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  });
  document.getElementById("diff-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const a = document.getElementById("diff-a").value;
    const b = document.getElementById("diff-b").value;
    try {
      const diff = await api("/v1/models/" + encodeURIComponent(info.name) + "/diff?a=" + a + "&b=" + b);
      const rows = [];
      for (const part of ["config", "preprocessing", "metrics"]) {
        for (const [field, pair] of Object.entries(diff[part] || {})) {
          rows.push(el("tr", {}, el("td", { text: part + "." + field }), el("td", { text: JSON.stringify(pair[0]) }),
            el("td", { text: JSON.stringify(pair[1]) })));
        }
      }
      if (diff.labels) rows.push(el("tr", {}, el("td", { text: "labels" }), el("td", { text: diff.labels[0].join(", ") }),
        el("td", { text: diff.labels[1].join(", ") })));
      rows.push(el("tr", {}, el("td", { text: "training data" }),
        el("td", { text: diff.data_changed ? "differs" : "same", colspan: 2 })));
      document.querySelector("#diff tbody").replaceChildren(...rows);
    } catch (err) {
      showError(err.message);
    }
  });
});
