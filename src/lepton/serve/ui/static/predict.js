"use strict";
// Predict: several images at once as a table; a viewer for the chosen one (CT window presets, a slice scroller
// for volumes) and its explanation with an opacity slider.
document.addEventListener("DOMContentLoaded", async () => {
  const { api, el, fmt, showError } = Lepton;
  const models = document.getElementById("model");
  const method = document.getElementById("method");
  const tbody = document.querySelector("#results tbody");
  const viewer = document.getElementById("viewer");
  const windowSel = document.getElementById("window");
  const slice = document.getElementById("slice");
  const sliceOut = document.getElementById("slice-out");
  const viewImage = document.getElementById("view-image");
  const heat = document.getElementById("overlay-heat");
  const opacity = document.getElementById("opacity");
  let current = null;  // {file, result, slices}

  try {
    await Lepton.start();
    const listed = await api("/v1/models");
    for (const m of listed.models) {
      models.append(el("option", { value: m.name, text: m.name + "@" + m.version + " (" + m.task + ")" }));
    }
    if (!listed.models.length) showError("No model this key may use is being served.");
  } catch (err) {
    showError(err.message);
    return;
  }

  function probabilities(result) {
    if (!result.probabilities) return "";
    return Object.entries(result.probabilities).map(([k, v]) => k + " " + fmt(v)).join(", ");
  }

  async function predictOne(file) {
    const row = el("tr", { "data-file": file.name }, el("td", { text: file.name }),
      el("td", { text: "…", class: "label" }), el("td"), el("td"), el("td"), el("td"), el("td"));
    tbody.append(row);
    const form = new FormData();
    form.append("file", file, file.name);
    const query = method.value ? "?explain=" + encodeURIComponent(method.value) : "";
    try {
      const result = await api("/v1/models/" + encodeURIComponent(models.value) + "/predict" + query,
        { method: "POST", body: form });
      const cells = row.children;
      cells[1].textContent = result.label !== undefined ? String(result.label) : result.task || "–";
      cells[2].textContent = probabilities(result);
      cells[3].textContent = result.threshold === null || result.threshold === undefined ? "arg-max"
        : fmt(result.threshold);
      cells[4].textContent = String(result.version);
      cells[5].textContent = fmt(result.latency_ms, 1);
      const show = el("button", { type: "button", text: "Show" });
      show.addEventListener("click", () => open(file, result));
      cells[6].append(show);
      if (!current) open(file, result);
    } catch (err) {
      row.children[1].textContent = "error";
      row.children[2].textContent = err.message;
      row.classList.add("failed");
    }
  }

  async function handle(files) {
    showError("");
    for (const file of files) await predictOne(file);  // one at a time: the server batches across users
  }

  async function loadView() {
    const params = new URLSearchParams({ filename: current.file.name });
    if (windowSel.value) params.set("window", windowSel.value);
    try {
      const view = await api("/v1/view?" + params, { method: "POST", body: current.file,
        headers: { "Content-Type": "application/octet-stream" } });
      current.slices = view.images;
      slice.max = String(view.slices - 1);
      slice.value = String(Math.floor((view.slices - 1) / 2));
      slice.disabled = view.slices < 2;
      showSlice();
    } catch (err) {
      showError("Viewer: " + err.message);
    }
  }

  function showSlice() {
    const i = Number(slice.value);
    sliceOut.textContent = (i + 1) + " / " + current.slices.length;
    viewImage.src = "data:image/png;base64," + current.slices[i];
  }

  function open(file, result) {
    current = { file, result, slices: [] };
    viewer.hidden = false;
    document.getElementById("viewer-title").textContent = "Viewer: " + file.name;
    const figure = document.getElementById("overlay-figure");
    const explanation = result.explanation;
    figure.hidden = !explanation;
    if (explanation) {
      document.getElementById("overlay-base").src = "data:image/png;base64," + explanation.image_png_base64;
      heat.src = "data:image/png;base64," + explanation.heatmap_png_base64;
      document.getElementById("overlay-caption").textContent =
        explanation.method + " for " + explanation.class + " (on the model's input)";
      setOpacity();
    }
    loadView();
  }

  function setOpacity() { heat.style.opacity = String(Number(opacity.value) / 100); }

  document.getElementById("files").addEventListener("change", (e) => handle([...e.target.files]));
  const drop = document.getElementById("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    handle([...e.dataTransfer.files]);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); document.getElementById("files").click(); }
  });
  windowSel.addEventListener("change", () => current && loadView());
  slice.addEventListener("input", () => current && current.slices.length && showSlice());
  opacity.addEventListener("input", setOpacity);
});
