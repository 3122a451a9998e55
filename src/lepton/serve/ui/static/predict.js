"use strict";
// Predict: several images at once as a table; a viewer for the chosen one (CT window presets, a slice scroller
// for volumes) and its explanation with an opacity slider; a segmentation's label map drawn over the image, each
// class with its own colour and toggle, and an opacity slider — a volume's map slice by slice with the scroller;
// a detector's boxes drawn with their labels and scores (a volume's boxes on the slices they span).
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
  const maskFigure = document.getElementById("mask-figure");
  const maskCanvas = document.getElementById("mask-canvas");
  const maskClasses = document.getElementById("mask-classes");
  const maskOpacity = document.getElementById("mask-opacity");
  const labelsOf = {};  // model name -> its class labels
  const taskOf = {};  // model name -> its task (explanations are for classifiers)
  // One colour per class index (background, 0, is never drawn): distinct hues that stay visible over greyscale.
  const PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]];
  let current = null;  // {file, result, slices}
  // {indices: Uint8Array, width, height, shown: Set of class indices}; a volume's also {volume, depth, slice}
  let mask = null;

  try {
    await Lepton.start();
    const listed = await api("/v1/models");
    for (const m of listed.models) {
      models.append(el("option", { value: m.name, text: m.name + "@" + m.version + " (" + m.task + ")" }));
      labelsOf[m.name] = m.labels || [];
      taskOf[m.name] = m.task;
    }
    if (!listed.models.length) showError("No model this key may use is being served.");
  } catch (err) {
    showError(err.message);
    return;
  }

  function sizes(result) {
    const unit = ["area_mm2", "volume_ml", "voxels"].find((k) => result[k]);
    if (!unit) return "";
    const name = { area_mm2: "mm²", volume_ml: "mL", voxels: "voxels" }[unit];
    return Object.entries(result[unit]).map(([k, v]) => k + " " + fmt(v, 1) + " " + name).join(", ");
  }

  function probabilities(result) {
    if (Array.isArray(result.boxes)) return result.boxes.map((b) => b.label + " " + fmt(b.score)).join(", ");
    if (!result.probabilities) return sizes(result);
    return Object.entries(result.probabilities).map(([k, v]) => k + " " + fmt(v)).join(", ");
  }

  async function predictOne(file) {
    const row = el("tr", { "data-file": file.name }, el("td", { text: file.name }),
      el("td", { text: "…", class: "label" }), el("td"), el("td"), el("td"), el("td"), el("td"));
    tbody.append(row);
    const form = new FormData();
    form.append("file", file, file.name);
    const explain = method.value && taskOf[models.value] === "classification";
    const query = explain ? "?explain=" + encodeURIComponent(method.value) : "";
    try {
      const result = await api("/v1/models/" + encodeURIComponent(models.value) + "/predict" + query,
        { method: "POST", body: form });
      const cells = row.children;
      cells[1].textContent = result.label !== undefined ? String(result.label)
        : Array.isArray(result.lesions) ? result.lesions.length + " lesion(s)"
          : Array.isArray(result.boxes) ? result.boxes.length + " box(es)" : result.task || "–";
      cells[2].textContent = probabilities(result);
      cells[3].textContent = result.threshold === null || result.threshold === undefined ? "arg-max"
        : fmt(result.threshold);
      cells[4].textContent = String(result.version);
      cells[5].textContent = fmt(result.latency_ms, 1);
      const show = el("button", { type: "button", text: "Show" });
      show.addEventListener("click", () => open(file, result));
      cells[6].append(show);
      result.labels = labelsOf[models.value] || [];
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
      current.indices = view.indices || view.images.map((_, i) => i);
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
    if (!maskFigure.hidden) document.getElementById("mask-base").src = viewImage.src;  // the map's own grid
    if (mask && mask.volume) showVolumeSlice(current.indices[i]);
    paintBoxes();
  }

  function open(file, result) {
    current = { file, result, slices: [], indices: [] };
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
    showMask(result);
    document.getElementById("boxes-figure").hidden = !Array.isArray(result.boxes);
    loadView();
  }

  // A detector's boxes (fractions of the image's width x, height y and depth z) over the viewer's slice, each with
  // its label and score; a volume's box where the slice's centre lies within its z extent. The canvas is the image
  // scaled up so the labels stay legible; data-boxes holds the drawn boxes in image pixels.
  function paintBoxes() {
    const figure = document.getElementById("boxes-figure");
    const base = document.getElementById("boxes-base");
    if (!current || figure.hidden || !current.slices.length) return;
    const i = Number(slice.value);
    base.src = viewImage.src;
    base.decode().then(() => {
      const width = base.naturalWidth, height = base.naturalHeight;
      const scale = Math.max(1, Math.ceil(320 / width));
      const canvas = document.getElementById("boxes-canvas");
      canvas.width = width * scale;
      canvas.height = height * scale;
      const ctx = canvas.getContext("2d");
      const depth = current.indices.length ? current.indices[current.indices.length - 1] + 1 : 1;
      const centre = (current.indices.length ? current.indices[i] + 0.5 : 0.5) / depth;
      const drawn = [];
      const labels = current.result.labels || [];
      for (const b of current.result.boxes) {
        const box = b.box;
        if (box.z0 !== undefined && !(box.z0 <= centre && centre <= box.z1)) continue;
        const k = Math.max(1, labels.indexOf(b.label) + 1);  // the palette's first entry is background
        const colour = "rgb(" + PALETTE[k % PALETTE.length].join(",") + ")";
        const [x0, y0, x1, y1] = [box.x0 * width, box.y0 * height, box.x1 * width, box.y1 * height];
        ctx.strokeStyle = colour;
        ctx.lineWidth = 2;
        ctx.strokeRect(x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale);
        ctx.font = "12px sans-serif";
        const text = b.label + " " + fmt(b.score);
        const top = Math.max(12, y0 * scale - 2);
        ctx.fillStyle = "rgba(0,0,0,0.6)";
        ctx.fillRect(x0 * scale, top - 12, ctx.measureText(text).width + 4, 14);
        ctx.fillStyle = colour;
        ctx.fillText(text, x0 * scale + 2, top);
        drawn.push([x0, y0, x1, y1].map((v) => Math.round(v * 100) / 100));
      }
      canvas.dataset.boxes = JSON.stringify(drawn);
      canvas.dataset.scale = String(scale);
      document.getElementById("boxes-caption").textContent = drawn.length + " of " +
        current.result.boxes.length + " box(es) on this " + (current.slices.length > 1 ? "slice" : "image");
    }).catch(() => {});
  }

  function setOpacity() { heat.style.opacity = String(Number(opacity.value) / 100); }

  // A segmentation's label map over the image: a 2-D map (a PNG of class indices on the image's own grid) decoded
  // once into indices, a volume's (gzipped NIfTI, uint8, on the volume's grid as the viewer slices it) into a
  // volume whose slice under the scroller is drawn; painted with the classes switched on.
  function showMask(result) {
    const map = result.label_map;
    mask = null;
    maskFigure.hidden = !(map && (map.format === "png" || map.format === "nifti"));
    if (maskFigure.hidden) return;
    if (map.format === "nifti") {
      readNifti(map.data).then((vol) => {
        if (current.result !== result) return;  // another file was opened meanwhile
        mask = { volume: vol.data, depth: vol.dims[0], height: vol.dims[1], width: vol.dims[2], shown: new Set(),
          indices: new Uint8Array(vol.dims[1] * vol.dims[2]), slice: -1 };
        classToggles(result, new Set(vol.data));
        const i = Number(slice.value);
        showVolumeSlice(current.indices.length ? current.indices[i] : Math.floor((mask.depth - 1) / 2));
      }).catch((err) => { maskFigure.hidden = true; showError("Segmentation: " + err.message); });
      return;
    }
    const image = new Image();
    image.addEventListener("load", () => {
      const scratch = document.createElement("canvas");
      scratch.width = image.naturalWidth;
      scratch.height = image.naturalHeight;
      const ctx = scratch.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(image, 0, 0);
      const rgba = ctx.getImageData(0, 0, scratch.width, scratch.height).data;
      const indices = new Uint8Array(scratch.width * scratch.height);
      for (let i = 0; i < indices.length; i++) indices[i] = rgba[4 * i];  // grey PNG: R = G = B = class
      mask = { indices, width: scratch.width, height: scratch.height, shown: new Set() };
      classToggles(result, new Set(indices));
      document.getElementById("mask-caption").textContent = "Segmentation (" + scratch.width + " × " +
        scratch.height + ")";
      paintMask();
    });
    image.src = "data:image/png;base64," + map.data;
  }

  // One toggle per class (its colour, its name, whether the map holds any of it), all switched on.
  function classToggles(result, present) {
    const labels = result.labels.length ? result.labels : ["background"];
    const toggles = [];
    for (let k = 1; k < Math.max(labels.length, Math.max(...present) + 1); k++) {
      const name = labels[k] || "class " + k;
      const box = el("input", { type: "checkbox", id: "mask-class-" + k, name: "mask-class", value: k,
        checked: true });
      box.addEventListener("change", () => {
        if (box.checked) mask.shown.add(k); else mask.shown.delete(k);
        paintMask();
      });
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = "rgb(" + PALETTE[k % PALETTE.length].join(",") + ")";
      toggles.push(el("label", { for: "mask-class-" + k }, box, swatch,
        name + (present.has(k) ? "" : " (none found)")));
      mask.shown.add(k);
    }
    maskClasses.replaceChildren(el("legend", { text: "Classes shown" }), ...toggles);
  }

  // A gzipped NIfTI-1 label map (uint8, 3-D, as the server writes it) read in the browser: dims and voxels. NIfTI
  // stores the first axis fastest, so voxel (d, h, w) sits at d + D * (h + H * w).
  async function readNifti(b64) {
    const packed = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("gzip"));
    const bytes = new Uint8Array(await new Response(stream).arrayBuffer());
    const view = new DataView(bytes.buffer);
    const little = view.getInt32(0, true) === 348;
    if (!little && view.getInt32(0, false) !== 348) throw new Error("the label map is not a NIfTI-1 file");
    const dims = [1, 2, 3].map((i) => view.getInt16(40 + 2 * i, little));
    if (view.getInt16(40, little) < 3 || view.getInt16(70, little) !== 2) {
      throw new Error("the label map is not a 3-D uint8 NIfTI volume");
    }
    const offset = Math.round(view.getFloat32(108, little));
    const count = dims[0] * dims[1] * dims[2];
    if (offset + count > bytes.length) throw new Error("the label map is truncated");
    return { dims, data: bytes.subarray(offset, offset + count) };
  }

  // Slice d of a volume's label map (rows H, columns W, as the viewer shows slice d) into the painted indices.
  function showVolumeSlice(d) {
    if (!mask || !mask.volume || d === undefined) return;
    const { depth, height, width } = mask;
    const k = Math.min(Math.max(0, d), depth - 1);
    for (let h = 0; h < height; h++) {
      for (let w = 0; w < width; w++) mask.indices[h * width + w] = mask.volume[k + depth * (h + height * w)];
    }
    mask.slice = k;
    maskCanvas.dataset.slice = String(k);
    document.getElementById("mask-caption").textContent = "Segmentation (" + width + " × " + height + " × " +
      depth + "), slice " + (k + 1);
    paintMask();
  }

  function paintMask() {
    if (!mask) return;
    maskCanvas.width = mask.width;
    maskCanvas.height = mask.height;
    const ctx = maskCanvas.getContext("2d");
    const out = ctx.createImageData(mask.width, mask.height);
    let painted = 0;
    for (let i = 0; i < mask.indices.length; i++) {
      const k = mask.indices[i];
      if (k === 0 || !mask.shown.has(k)) continue;
      const [r, g, b] = PALETTE[k % PALETTE.length];
      out.data.set([r, g, b, 255], 4 * i);
      painted++;
    }
    ctx.putImageData(out, 0, 0);
    maskCanvas.dataset.painted = String(painted);
    setMaskOpacity();
  }

  function setMaskOpacity() { maskCanvas.style.opacity = String(Number(maskOpacity.value) / 100); }

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
  maskOpacity.addEventListener("input", setMaskOpacity);
});
