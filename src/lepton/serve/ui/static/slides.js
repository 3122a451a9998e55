"use strict";
// Slides: a whole slide submitted to a slide model as a job (POST /v1/slide-models/{name}/jobs), followed until it
// ends (GET /v1/slide-jobs/{id}), then its probability and the attention heatmap over the slide's thumbnail.
document.addEventListener("DOMContentLoaded", async () => {
  const { api, fmt, el, showError } = Lepton;
  const models = document.getElementById("slide-model");
  const file = document.getElementById("slide-file");
  const status = document.getElementById("job-status");
  const progress = document.getElementById("job-progress");
  const result = document.getElementById("job-result");
  const figure = document.getElementById("job-figure");
  const heatmap = document.getElementById("job-heatmap");
  const downloads = document.getElementById("job-downloads");
  let geojson = null;
  let shown = null;  // the object URL of the heatmap on screen

  try {
    await Lepton.start();
    const listed = await api("/v1/slide-models");
    for (const m of listed.models) {
      models.append(el("option", { value: m.name, text: m.name + "@" + m.version + " (" + m.labels.join(" / ") +
        ", tiles " + m.tile.size + " px at " + m.tile.mpp + " µm/px)" }));
    }
    const wanted = new URLSearchParams(location.search).get("model");  // the Models page's link names one
    if (listed.models.some((m) => m.name === wanted)) models.value = wanted;
    if (!listed.models.length) showError("No slide model this key may use is being served.");
    else await showCard();
  } catch (err) {
    showError(err.message);
    return;
  }

  async function showCard() {
    const card = await api("/v1/slide-models/" + encodeURIComponent(models.value) + "/card");
    // Rendered by the server from Markdown with raw HTML off: any tag a card holds arrives as text.
    document.getElementById("slide-card").innerHTML = card.html;
  }

  models.addEventListener("change", () => showCard().catch((err) => showError(err.message)));

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function follow(id) {
    for (;;) {
      const job = await api("/v1/slide-jobs/" + encodeURIComponent(id));
      const p = job.progress || {};
      if (p.tiles) { progress.max = p.tiles; progress.value = p.tiles_done || 0; }
      status.textContent = "Job " + id.slice(0, 8) + ": " + job.status +
        (p.tiles ? " — " + (p.tiles_done || 0) + " of " + p.tiles + " tiles" : "");
      if (job.status === "done" || job.status === "failed") return job;
      await sleep(500);
    }
  }

  async function show(job) {
    const r = job.result;
    document.getElementById("job-label").textContent = r.label;
    document.getElementById("job-probability").textContent =
      "P(" + r.labels[r.labels.length - 1] + ") = " + fmt(r.probability);
    document.getElementById("job-threshold").textContent = fmt(r.threshold);
    document.getElementById("job-tiles").textContent = String(r.tiles);
    document.getElementById("job-regions").textContent = String(r.regions.length);
    result.hidden = false;
    geojson = r.geojson;
    downloads.hidden = false;
    const response = await fetch(job.files.heatmap, { headers: { Authorization: "Bearer " + Lepton.key() } });
    if (!response.ok) throw new Error("The heatmap could not be fetched (HTTP " + response.status + ")");
    if (shown) URL.revokeObjectURL(shown);
    shown = URL.createObjectURL(await response.blob());
    heatmap.src = shown;
    figure.hidden = false;
  }

  file.addEventListener("change", async () => {
    const chosen = file.files[0];
    if (!chosen || !models.value) return;
    showError("");
    result.hidden = figure.hidden = downloads.hidden = true;
    progress.value = 0;
    status.textContent = "Uploading " + chosen.name + "…";
    try {
      const accepted = await api("/v1/slide-models/" + encodeURIComponent(models.value) + "/jobs?filename=" +
        encodeURIComponent(chosen.name), { method: "POST", body: chosen,
        headers: { "Content-Type": "application/octet-stream" } });
      const job = await follow(accepted.id);
      if (job.status === "failed") throw new Error("The job failed: " + job.error);
      await show(job);
    } catch (err) {
      status.textContent = "No result.";
      showError(err.message);
    } finally {
      file.value = "";
    }
  });

  document.getElementById("job-geojson").addEventListener("click", () => {
    if (!geojson) return;
    const url = URL.createObjectURL(new Blob([JSON.stringify(geojson)], { type: "application/geo+json" }));
    const link = el("a", { href: url, download: "regions.geojson" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });
});
