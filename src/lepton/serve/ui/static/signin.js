"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("signin-form");
  if (new URLSearchParams(location.search).get("expired")) {
    Lepton.showError("The key was not accepted or has been revoked: sign in again.");
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = document.getElementById("key").value.trim();
    if (!value) return;
    Lepton.signIn(value);
    try {
      await Lepton.api("/v1/whoami");
      location.assign("/ui/predict");
    } catch (err) {
      sessionStorage.clear();
      Lepton.showError(err.status === 401 ? "That key is not valid." : err.message);
    }
  });
  document.getElementById("key").focus();
});
