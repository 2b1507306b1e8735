// qtune studio: the start: each screen wires its form and buttons, then the router shows the screen the URL names.
"use strict";

(function (studio) {
  const { $, el, api, route } = studio;

  async function loadInfo() {
    try {
      const info = await api("GET", "/api/info");
      const box = $("#project-info");
      box.replaceChildren(
        el("span", { class: "mono", title: info.project }, info.project),
        info.version ? el("span", { class: "muted" }, `v${info.version}`) : null);
    } catch (e) {
      const box = $("#project-info");
      box.replaceChildren(el("span", { class: "warn" }, e.status === 401 ? "token needed" : "studio unreachable"));
    }
  }

  function init() {
    studio.initRuns();
    studio.initAdapters();
    studio.initPlayground();
    studio.initPlan();
    window.addEventListener("hashchange", route);
    route();
    loadInfo();
  }

  // deferred scripts run before DOMContentLoaded, once the page is parsed; the check keeps an async load working too
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})(window.qtuneStudio);
