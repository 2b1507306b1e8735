// qtune studio: the Playground screen (docs/studio.md, Playground): load the base with its adapters, then one
// prompt answered side by side, streamed from /v1/chat/completions (or /v1/classify for a classifier).
"use strict";

(function (studio) {
  const { $, $$, el, setText, show, ApiError, headers, errorFrom, api, clearErrors, showError, bannerOnly,
    screenEnter } = studio;

  const pg = { screen: null, state: null, models: [], timer: null, streams: [] , checked: null };
  const MAX_MODELS = 4;

  function renderPlayground(data) {
    pg.state = data.state;
    const state = $("#pg-state");
    state.className = `badge pgstate-${data.state}`;
    setText(state, data.state === "loading" ? "loading…" : data.state);
    setText($("#pg-base"), data.base ? `base: ${data.base}` : "");
    const ready = data.state === "ready";
    show($("#pg-idle"), !ready);
    show($("#pg-ready"), ready);
    const load = $("#pg-load");
    load.disabled = data.state === "loading";
    // once loaded, Load again registers the adapters trained since
    setText(load, { loading: "Loading…", failed: "Try again", ready: "Reload adapters" }[data.state] || "Load");
    load.classList.toggle("primary", !ready);
    load.title = ready ? "register the adapters trained since the last load" : "";
    setText($("#pg-idle-text"), data.state === "loading"
      ? "Loading the base model and its adapters…"
      : "Press Load to load the base model with the adapters trained on it, then compare their answers side by side.");
    const errLine = $("#pg-error");
    setText(errLine, data.error ? `error: ${data.error}` : "");
    show(errLine, !!data.error);

    const skipped = data.skipped || [];
    setText($("#pg-skipped"), skipped.length ? `Not loaded: ${skipped.map((s) => `${s.name} (${s.reason})`).join("; ")}` : "");
    show($("#pg-skipped"), skipped.length > 0);

    const models = data.models || [];
    const sameModels = JSON.stringify(models.map((m) => [m.id, m.kind])) === JSON.stringify(pg.models.map((m) => [m.id, m.kind]));
    pg.models = models;
    if (!ready || sameModels && $("#pg-models").childElementCount) return;
    const before = pg.checked || new Set(["base", ...models.filter((m) => m.id !== "base").slice(0, 1).map((m) => m.id)]);
    $("#pg-models").replaceChildren(...models.map((m) => {
      const box = el("input", { type: "checkbox", value: m.id });
      box.checked = before.has(m.id);
      return el("label", { class: "pg-model", title: m.system_prompt ? `system prompt: ${m.system_prompt}` : "" },
        box, el("span", { class: "mono" }, m.id),
        m.id === "base" ? el("span", { class: "muted small" }, "no adapter")
          : el("span", { class: `badge kind-${m.kind}` }, m.kind === "classifier" ? "classifier" : "adapter"));
    }));
    syncChecks();
  }

  function checkedModels() {
    return $$("#pg-models input[type=checkbox]").filter((b) => b.checked).map((b) => b.value);
  }

  function syncChecks() {
    const boxes = $$("#pg-models input[type=checkbox]");
    const n = boxes.filter((b) => b.checked).length;
    for (const b of boxes) {
      b.disabled = !b.checked && n >= MAX_MODELS;
      b.parentElement.classList.toggle("disabled", b.disabled);
      b.parentElement.classList.toggle("checked", b.checked);
    }
    pg.checked = new Set(boxes.filter((b) => b.checked).map((b) => b.value));
    $("#pg-send").disabled = n === 0;
  }

  async function pollPlayground() {
    if (pg.timer) clearTimeout(pg.timer);
    pg.timer = null;
    try {
      renderPlayground(await api("GET", "/api/playground"));
    } catch (e) {
      bannerOnly(pg.screen, e);
    }
    if (pg.state === "loading" && studio.current() === "playground") pg.timer = setTimeout(pollPlayground, 1000);
  }

  async function loadPlayground() {
    clearErrors(pg.screen);
    $("#pg-load").disabled = true;
    try {
      await api("POST", "/api/playground/load", {});
    } catch (e) {
      bannerOnly(pg.screen, e);
    }
    pollPlayground();
  }

  function answerColumn(model) {
    const classifier = model.kind === "classifier";
    return el("div", { class: "card pg-answer", dataset: { model: model.id } },
      el("div", { class: "pg-answer-head" },
        el("span", { class: "mono pg-answer-name" }, model.id),
        el("span", { class: "pg-spinner", title: "answering" })),
      el("div", { class: "pg-system muted small" }, classifier ? "classifier: label probabilities" :
        model.system_prompt ? `system: ${model.system_prompt}` : "no system prompt"),
      classifier ? el("div", { class: "pg-probs" }) : el("div", { class: "pg-text" }),
      el("div", { class: "pg-foot muted small mono" }));
  }

  function finish(column, error, foot) {
    column.dataset.done = "true";
    column.classList.remove("streaming");
    if (error) {
      column.classList.add("failed");
      column.append(el("p", { class: "error-line" }, error));
    }
    if (foot) setText($(".pg-foot", column), foot);
  }

  async function streamChat(column, model, prompt, maxTokens, signal) {
    const text = $(".pg-text", column);
    const started = performance.now();
    let finishReason = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(true), signal,
        body: JSON.stringify({ model: model.id, messages: [{ role: "user", content: prompt }], stream: true, max_tokens: maxTokens }),
      });
      if (!response.ok) throw await errorFrom(response);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "", done = false;
      while (!done) {
        const { value, done: end } = await reader.read();
        if (end) break;
        buffer += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") { done = true; break; }
          let chunk;
          try { chunk = JSON.parse(payload); } catch (_) { continue; }
          if (chunk.error) throw new ApiError(0, chunk.error.message || "the model failed");
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            text.append(document.createTextNode(choice.delta.content));
          }
          if (choice.finish_reason) finishReason = choice.finish_reason;
        }
      }
      if (done) reader.cancel().catch(() => {});
      const secs = (performance.now() - started) / 1000;
      if (!text.textContent) text.classList.add("empty-answer");
      const why = { length: "max tokens reached", stop: "finished", timeout: "timed out" }[finishReason] || finishReason;
      finish(column, null, `${secs.toFixed(1)} s${why ? ` · ${why}` : ""}`);
    } catch (e) {
      if (e.name === "AbortError") finish(column, null, "cancelled");
      else finish(column, e.message || String(e));
    }
  }

  async function classify(column, model, prompt, signal) {
    const box = $(".pg-probs", column);
    try {
      const response = await fetch("/v1/classify", {
        method: "POST", headers: headers(true), signal, body: JSON.stringify({ model: model.id, input: prompt }),
      });
      if (!response.ok) throw await errorFrom(response);
      const data = await response.json();
      const first = (data.data || [])[0] || {};
      const probs = Object.entries(first.probabilities || {}).sort((a, b) => b[1] - a[1]);
      box.replaceChildren(...probs.map(([label, p]) => {
        const fill = el("div", { class: "prob-fill" });
        fill.style.width = `${(p * 100).toFixed(1)}%`;
        return el("div", { class: `pg-prob${label === first.label ? " top" : ""}`, dataset: { label } },
          el("span", { class: "prob-label mono" }, label),
          el("div", { class: "prob-bar" }, fill),
          el("span", { class: "prob-value mono" }, `${(p * 100).toFixed(1)}%`));
      }));
      finish(column, null, first.label !== undefined ? `label: ${first.label}` : "");
    } catch (e) {
      if (e.name === "AbortError") finish(column, null, "cancelled");
      else finish(column, e.message || String(e));
    }
  }

  function send() {
    clearErrors(pg.screen);
    const prompt = $("#pg-prompt").value;
    if (!prompt.trim()) { showError(pg.screen, new ApiError(400, "write a prompt first", "prompt")); return; }
    const ids = checkedModels();
    if (!ids.length) { bannerOnly(pg.screen, new Error("check at least one model")); return; }
    let maxTokens = parseInt($("#pg-max-tokens").value, 10);
    if (!(maxTokens > 0)) { maxTokens = 64; $("#pg-max-tokens").value = "64"; }
    for (const c of pg.streams) c.abort();
    const controller = new AbortController();
    pg.streams = [controller];
    const models = ids.map((id) => pg.models.find((m) => m.id === id)).filter(Boolean);
    const answers = $("#pg-answers");
    answers.className = `pg-answers cols-${models.length}`;
    const columns = models.map(answerColumn);
    answers.replaceChildren(...columns);
    // every column starts at once: the server batches them
    models.forEach((m, i) => {
      columns[i].classList.add("streaming");
      if (m.kind === "classifier") classify(columns[i], m, prompt, controller.signal);
      else streamChat(columns[i], m, prompt, maxTokens, controller.signal);
    });
  }

  function initPlayground() {
    pg.screen = $("#screen-playground");
    $("#pg-load").addEventListener("click", loadPlayground);
    $("#pg-models").addEventListener("change", syncChecks);
    $("#pg-send").addEventListener("click", send);
    $("#pg-prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); } });
    screenEnter.playground = pollPlayground;
  }

  studio.initPlayground = initPlayground;
})(window.qtuneStudio);
