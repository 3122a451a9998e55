"use strict";
// Lepton's console: the shared parts. The API key stays in this tab's sessionStorage and goes out as a Bearer
// header; everything a user wrote is set as text (textContent), never parsed as HTML.
const Lepton = (() => {
  const STORE = "lepton.key";

  function key() { return sessionStorage.getItem(STORE); }

  function signIn(value) { sessionStorage.setItem(STORE, value); }

  function signOut() {
    sessionStorage.removeItem(STORE);
    location.assign("/ui/");
  }

  function showError(message) {
    const box = document.getElementById("error");
    if (!box) return;
    box.textContent = message || "";
    box.hidden = !message;
  }

  // A request to the server's API; JSON back, or an Error carrying the server's own message.
  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    const k = key();
    if (k) headers.Authorization = "Bearer " + k;
    let response;
    try {
      response = await fetch(path, Object.assign({}, options, { headers }));
    } catch (err) {
      throw new Error("The server cannot be reached: " + err.message);
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (response.status === 401 && document.body.dataset.page !== "signin") {
      sessionStorage.removeItem(STORE);
      location.assign("/ui/?expired=1");
      throw new Error("Signed out: the key was not accepted.");
    }
    if (!response.ok) {
      const detail = body && body.error ? (body.error.message || body.error) : response.statusText;
      const error = new Error(detail + " (HTTP " + response.status + ")");
      error.status = response.status;
      throw error;
    }
    return body;
  }

  // A DOM element with attributes and children (strings become text nodes).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmt(x, digits = 3) {
    return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
  }

  let whoami = null;

  // Pages other than sign-in need a key: without one, back to sign-in.
  async function start() {
    const page = document.body.dataset.page;
    for (const link of document.querySelectorAll("[data-nav]")) {
      if (link.dataset.nav === page) link.setAttribute("aria-current", "page");
    }
    const out = document.getElementById("signout");
    if (page === "signin") return null;
    if (!key()) {
      location.assign("/ui/");
      return null;
    }
    out.hidden = false;
    out.addEventListener("click", signOut);
    whoami = await api("/v1/whoami");
    document.getElementById("who").textContent =
      whoami.auth ? "tenant " + whoami.tenant + " · " + whoami.scope : "authentication off";
    document.body.classList.toggle("is-admin", whoami.scope === "admin");
    return whoami;
  }

  return { api, el, fmt, key, signIn, signOut, showError, start, whoami: () => whoami };
})();
