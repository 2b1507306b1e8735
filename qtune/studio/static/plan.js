// qtune studio: the Plan screen (docs/studio.md, Plan): the memory a run needs as a bar against the card's size.
"use strict";

(function (studio) {
  const { $, $$, el, setText, show, gib, ApiError, api, clearErrors, showError, bannerOnly, screenEnter } = studio;

  const plan = { screen: null, loaded: false };

  async function loadPlanModels() {
    try {
      const data = await api("GET", "/api/plan/models");
      const select = $("#plan-model");
      const keep = select.value;
      const models = data.models || [];
      select.replaceChildren(...models.map((m) => el("option", { value: m }, m)));
      if (keep && models.includes(keep)) select.value = keep;
      else if (models.includes("llama-3.1-8b")) select.value = "llama-3.1-8b";
      plan.loaded = true;
    } catch (e) {
      bannerOnly(plan.screen, e);
    }
  }

  function renderPlan(p) {
    show($("#plan-none"), false);
    show($("#plan-body"), true);
    const parts = p.parts || [];
    const total = p.total_bytes || parts.reduce((s, x) => s + x.bytes, 0);
    const vram = p.vram_bytes || 0;
    const scale = Math.max(total, vram) || 1;
    const bar = $("#plan-bar");
    const marker = $(".plan-vram", bar);
    for (const old of $$(".plan-part", bar)) old.remove();
    parts.forEach((part, i) => {
      const seg = el("div", { class: `plan-part c${i % 10}${part.bytes ? "" : " zero"}`, dataset: { part: part.name }, title: `${part.name}: ${gib(part.bytes)}` });
      seg.style.width = `${((part.bytes / scale) * 100).toFixed(3)}%`;
      bar.insertBefore(seg, marker);
    });
    bar.classList.toggle("over", vram > 0 && total > vram);
    show(marker, vram > 0);
    if (vram > 0) {
      marker.style.left = `${((vram / scale) * 100).toFixed(3)}%`;
      setText($(".plan-vram-label", marker), `card ${gib(vram)}`);
      marker.classList.toggle("flip", vram / scale > 0.8);
    }
    setText($("#plan-scale-max"), gib(scale));
    $("#plan-legend").replaceChildren(...parts.map((part, i) =>
      el("li", { class: part.bytes ? "" : "zero" }, el("span", { class: `swatch c${i % 10}` }), el("span", { class: "legend-name" }, part.name),
        el("span", { class: "mono legend-value" }, gib(part.bytes)))));
    const verdict = $("#plan-verdict");
    verdict.className = `verdict ${p.fits === true ? "fits" : p.fits === false ? "nofit" : "unknown"}`;
    setText(verdict, p.fits === true ? "fits" : p.fits === false ? "does not fit" : "no VRAM given");
    setText($("#plan-total"), `${gib(total)}${vram ? ` of ${gib(vram)}` : ""}`);
    // longest_seq is what fits at micro-batch 1 with every layer checkpointed (what train.fit_to_vram falls back to)
    setText($("#plan-longest"), p.longest_seq !== null && p.longest_seq !== undefined
      ? `longest sequence that fits: ${p.longest_seq.toLocaleString("en-US")} tokens${p.longest_seq > 0 ? "" : " (none fits)"}`
      : "");
    $("#plan-longest").title = "at micro-batch 1 with gradient checkpointing (what train.fit_to_vram falls back to)";
    show($("#plan-longest-note"), p.longest_seq !== null && p.longest_seq !== undefined);
    setText($("#plan-text"), p.text || "");
  }

  async function runPlan(event) {
    if (event) event.preventDefault();
    clearErrors(plan.screen);
    const intOf = (id) => { const v = $(id).value.trim(); return /^\d+$/.test(v) ? parseInt(v, 10) : v; };
    const body = {
      model: $("#plan-model").value, vram: $("#plan-vram").value.trim(),
      seq: intOf("#plan-seq"), lora_r: intOf("#plan-rank"), quant: $("#plan-quant").value, batch: intOf("#plan-batch"),
      gradient_checkpointing: $("#plan-checkpointing").value,
    };
    if (!body.model) { showError(plan.screen, new ApiError(400, "choose a model", "model")); return; }
    const go = $("#plan-go");
    go.disabled = true;
    try {
      renderPlan(await api("POST", "/api/plan", body));
    } catch (e) {
      showError(plan.screen, e);
    } finally {
      go.disabled = false;
    }
  }

  function initPlan() {
    plan.screen = $("#screen-plan");
    $("#plan-form").addEventListener("submit", runPlan);
    screenEnter.plan = () => { if (!plan.loaded) loadPlanModels(); };
  }

  studio.initPlan = initPlan;
})(window.qtuneStudio);
