// The saliency viewer: pick an image, models, methods and parameters; compare the maps side by side.
// Colour map and opacity are applied here, on canvases, so changing them sends no request.
import { Api, ApiError } from "./api.js";
import { blend, colorize, lookupTable } from "./colormaps.js";

const DISPLAY_MAX = 960; // longest side of the image as drawn in the page (a 2000 x 1500 photo is drawn at 960 x 720)
const JOB_PASSES = 512; // estimated forward+backward passes from which a request runs as a job
const POLL_MS = 300;
const SANITY_POLL_MS = 1000;
const METRICS_STEPS = 20; // the server's default K: 4(K-1)+1 = 77 forward passes per image
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};

const state = {
  models: [],
  methods: [],
  image: null, // {file, stem, width, height, display: ImageBitmap | null}
  cards: new Map(), // method name -> card
  sanityRuns: new Map(), // model name -> {active, job, jobId, error}: a sanity check this page follows
  colormap: "jet",
  opacity: 0.5,
};

const api = new Api(() => $("#api-key").value.trim());

// ---------------------------------------------------------------------------------------------- start

async function start() {
  const key = sessionStorage.getItem("saliency-api-key");
  if (key) $("#api-key").value = key;
  $("#api-key").addEventListener("change", () => {
    sessionStorage.setItem("saliency-api-key", $("#api-key").value.trim());
    if (!state.methods.length) loadCatalog();
  });
  wireImageInput();
  wireDisplayControls();
  $("#run-form").addEventListener("submit", onRun);
  $("#model-select").addEventListener("change", onModelChange);
  $("#sanity-run").addEventListener("click", () => currentModel() && runSanity(currentModel().name));
  await waitReady();
  await loadCatalog();
}

function setServerStatus(text, ok = true) {
  const node = $("#server-status");
  node.textContent = text;
  node.dataset.ok = String(ok);
}

async function waitReady() {
  for (;;) {
    try {
      const response = await fetch("/readyz", { headers: { Accept: "application/json" } });
      const body = await response.json().catch(() => ({}));
      if (response.ok) return;
      setServerStatus(body.error ? `The server could not load its models: ${body.error}`
                                 : "The server is starting (loading models)…", !body.error);
    } catch (err) {
      setServerStatus("Cannot reach the server; retrying…", false);
    }
    await sleep(2000);
  }
}

async function loadCatalog() {
  try {
    const [models, methods] = await Promise.all([api.get("/v1/models"), api.get("/v1/methods")]);
    state.models = models.data;
    state.methods = methods.data;
  } catch (err) {
    setServerStatus(err.message, false);
    return;
  }
  const ready = state.models.filter((m) => m.available);
  const device = ready.length ? ready[0].device : "no device";
  setServerStatus(`Ready: ${ready.length} model${ready.length === 1 ? "" : "s"} on ${device}`);
  buildModelSelect();
  buildMethods();
  updateRunButton();
}

// ---------------------------------------------------------------------------------------------- form

function buildModelSelect() {
  const select = $("#model-select");
  select.replaceChildren();
  for (const m of state.models) {
    const option = el("option", { value: m.name, disabled: !m.available,
                                  textContent: m.available ? m.name : `${m.name} (unavailable)` });
    if (m.default) option.selected = true;
    select.append(option);
  }
  onModelChange();
}

function currentModel() {
  return state.models.find((m) => m.name === $("#model-select").value);
}

function onModelChange() {
  const model = currentModel();
  const info = $("#model-info");
  if (!model) {
    info.textContent = "";
    return;
  }
  info.textContent = model.available
    ? `${model.description || model.architecture}; input ${model.input_size.join(" × ")}, ${model.num_classes} classes, on ${model.device}.`
    : `Unavailable: ${model.reason}`;
  for (const select of document.querySelectorAll("select[data-param='layer']")) fillLayers(select, model);
  renderSanity();
}

function fillLayers(select, model) {
  const keep = select.value;
  select.replaceChildren(el("option", { value: "", textContent: `default (${model.default_layer || "the card's"})` }));
  for (const layer of model.layers || []) select.append(el("option", { value: layer, textContent: layer }));
  select.value = (model.layers || []).includes(keep) ? keep : "";
}

function buildMethods() {
  const box = $("#methods");
  box.replaceChildren(el("legend", { textContent: "Methods" }), $("#sanity"));
  const params = $("#params");
  params.replaceChildren();
  // Every fact about a method comes from GET /v1/methods (its class declares them); the first is checked.
  for (const [index, method] of state.methods.entries()) {
    const id = `method-${method.name}`;
    const check = el("input", { type: "checkbox", id, value: method.name, name: "method",
                                checked: index === 0 });
    check.setAttribute("aria-describedby", `${id}-cost ${id}-sanity ${id}-sanity-reason`);
    const option = el("div", { className: "method-option" }, check,
                      el("div", { className: "method-name" }, el("label", { htmlFor: id, textContent: method.title }),
                         el("span", { className: "badge", id: `${id}-sanity`, hidden: true })),
                      el("p", { className: "hint", id: `${id}-cost`, textContent: `${method.name}: ${method.cost}` }),
                      el("p", { className: "hint sanity-reason", id: `${id}-sanity-reason`, hidden: true }));
    option.dataset.method = method.name;
    box.append(option);
    const fields = buildParams(method);
    if (fields) {
      fields.hidden = !check.checked;
      params.append(fields);
    }
    check.addEventListener("change", () => {
      if (fields) fields.hidden = !check.checked;
      updateRunButton();
    });
  }
  box.addEventListener("change", updateRunButton);
  renderSanity();
}

/** Nullable schemas (anyOf [X, null]) unwrap to X; the parameter may then be left empty. */
function unwrap(spec) {
  if (!spec.anyOf) return { ...spec, nullable: false };
  const inner = spec.anyOf.find((s) => s.type !== "null") || {};
  return { ...inner, ...spec, anyOf: undefined, type: inner.type, nullable: true };
}

function describeBounds(spec) {
  const parts = [];
  if (spec.default !== undefined && spec.default !== null) parts.push(`default ${spec.default}`);
  const low = spec.minimum ?? spec.exclusiveMinimum;
  const high = spec.maximum ?? spec.exclusiveMaximum;
  if (low !== undefined || high !== undefined) {
    const lo = low === undefined ? "" : `${spec.exclusiveMinimum !== undefined ? "> " : ""}${low}`;
    const hi = high === undefined ? "" : `${spec.exclusiveMaximum !== undefined ? "< " : ""}${high}`;
    parts.push(lo && hi ? `range ${lo} to ${hi}` : lo ? `at least ${lo}` : `at most ${hi}`);
  }
  return parts.join("; ");
}

function buildParams(method) {
  const properties = (method.parameters && method.parameters.properties) || {};
  const names = Object.keys(properties);
  if (!names.length) return null;
  const fields = el("fieldset", { id: `params-${method.name}` }, el("legend", { textContent: `${method.title} parameters` }));
  fields.dataset.method = method.name;
  for (const name of names) {
    const spec = unwrap(properties[name]);
    const id = `param-${method.name}-${name}`;
    let control;
    if (name === "layer") {
      control = el("select", { id });
      const model = currentModel();
      if (model) fillLayers(control, model);
    } else if (spec.enum) {
      control = el("select", { id });
      for (const value of spec.enum) control.append(el("option", { value, textContent: value,
                                                                   selected: value === spec.default }));
    } else if (spec.type === "integer" || spec.type === "number") {
      control = el("input", { id, type: "number", inputMode: spec.type === "integer" ? "numeric" : "decimal" });
      control.step = spec.type === "integer" ? "1" : "any";
      if (spec.minimum !== undefined) control.min = spec.minimum;
      if (spec.maximum !== undefined) control.max = spec.maximum;
      if (spec.default !== undefined && spec.default !== null) control.value = spec.default;
      else control.placeholder = "default";
    } else {
      control = el("input", { id, type: "text", placeholder: spec.default ?? "default" });
      if (spec.maxLength) control.maxLength = spec.maxLength;
    }
    control.dataset.param = name;
    control.dataset.spec = JSON.stringify(spec);
    const hintId = `${id}-hint`;
    control.setAttribute("aria-describedby", hintId);
    const bounds = describeBounds(spec);
    fields.append(el("div", { className: "param" }, el("label", { htmlFor: id, textContent: name }), control,
                     el("p", { className: "hint", id: hintId,
                               textContent: [spec.description, capitalize(bounds)].filter(Boolean).join(". ") })));
  }
  return fields;
}

/** The method's parameters as typed by the user; empty fields are left to the server's defaults. */
function readParams(method) {
  const fields = document.getElementById(`params-${method.name}`);
  const params = {};
  if (!fields) return params;
  for (const control of fields.querySelectorAll("[data-param]")) {
    const name = control.dataset.param;
    const spec = JSON.parse(control.dataset.spec);
    const value = control.value.trim();
    if (value === "") continue;
    if (control.type === "number") {
      const number = Number(value);
      const low = spec.exclusiveMinimum;
      const high = spec.exclusiveMaximum;
      if (!control.checkValidity() || !Number.isFinite(number) || (low !== undefined && number <= low)
          || (high !== undefined && number >= high)) {
        const bounds = describeBounds(spec);
        throw new ApiError(`${method.title}: ${name} must be ${spec.type === "integer" ? "a whole number" : "a number"}`
                           + `${bounds ? ` (${bounds})` : ""}.`, 0, "invalid_input");
      }
      params[name] = number;
    } else {
      params[name] = value;
    }
  }
  return params;
}

function checkedMethods() {
  return [...document.querySelectorAll("#methods input[name='method']:checked")]
    .map((c) => state.methods.find((m) => m.name === c.value));
}

function updateRunButton() {
  $("#run-button").disabled = !(state.image && state.methods.length && checkedMethods().length);
}

function showFormError(message) {
  const node = $("#form-error");
  node.textContent = message || "";
  node.hidden = !message;
}

// ---------------------------------------------------------------------------------------------- sanity

// GET /v1/models gives each model `sanity`: null before any report, else {status, job_id, methods: {name:
// {verdict, reason}}}. A server without the sanity report sends no `sanity` at all: then nothing is shown.

/** The verdict on `methodName` in `model`'s newest finished sanity report, or null. */
function sanityVerdict(model, methodName) {
  const methods = model && model.sanity && model.sanity.methods;
  return (methods && methods[methodName]) || null;
}

function sanityBadge(badge, verdict) {
  badge.hidden = !verdict;
  if (!verdict) return;
  const pass = verdict.verdict === "pass";
  badge.textContent = pass ? "sanity: pass" : "sanity: fail";
  badge.dataset.verdict = pass ? "pass" : "fail";
  badge.title = verdict.reason || "";
}

function renderSanity() {
  const model = currentModel();
  const supported = Boolean(model && model.available && "sanity" in model);
  for (const option of document.querySelectorAll("#methods .method-option")) {
    const verdict = supported ? sanityVerdict(model, option.dataset.method) : null;
    sanityBadge($(".badge", option), verdict);
    const reason = $(".sanity-reason", option);
    reason.hidden = !verdict || verdict.verdict === "pass";
    reason.textContent = reason.hidden ? "" : `Sanity check failed: ${verdict.reason || "no reason given"}`;
  }
  const box = $("#sanity");
  box.hidden = !supported;
  if (!supported) return;
  const sanity = model.sanity;
  const run = state.sanityRuns.get(model.name);
  // A check started elsewhere (another tab, a script) and still going: follow it too.
  if (sanity && ["queued", "running"].includes(sanity.status) && sanity.job_id
      && !(run && (run.active || run.jobId === sanity.job_id))) {
    followSanity(model.name, { id: sanity.job_id, status: sanity.status, progress: null });
    return;
  }
  const active = Boolean(run && run.active);
  const progress = $("#sanity-progress");
  const button = $("#sanity-run");
  let text;
  if (active) {
    const job = run.job;
    const counts = job && job.progress && job.progress.total ? job.progress : null;
    text = !job ? "Starting the sanity check…"
      : job.status === "queued" ? "Sanity check queued…"
      : `Sanity check running${counts ? `: ${counts.done} / ${counts.total} steps` : "…"}`;
    progress.hidden = !counts;
    if (counts) {
      progress.max = Math.max(1, counts.total);
      progress.value = Math.min(counts.done, progress.max);
      progress.setAttribute("aria-valuetext", `${counts.done} of ${counts.total} steps`);
    }
  } else {
    progress.hidden = true;
    if (!sanity) text = `No sanity report yet for ${model.name}.`;
    else if (sanity.status === "done") {
      const verdicts = Object.values(sanity.methods || {});
      const fails = verdicts.filter((v) => v.verdict !== "pass").length;
      const passes = verdicts.length - fails;
      text = `Sanity report for ${model.name}: ${passes} method${passes === 1 ? " passes" : "s pass"}, `
           + `${fails} fail${fails === 1 ? "s" : ""}.`;
    } else if (sanity.status === "failed") text = `The last sanity check of ${model.name} failed.`;
    else if (sanity.status === "cancelled") text = `The last sanity check of ${model.name} was cancelled.`;
    else text = `Sanity check of ${model.name}: ${sanity.status}.`;
  }
  $("#sanity-status").textContent = text;
  // A finished report stands for these weights (the server keeps it per weights and seed): nothing to rerun.
  button.hidden = active || Boolean(sanity && sanity.status === "done");
  const error = $("#sanity-error");
  error.textContent = (!active && run && run.error) || "";
  error.hidden = !error.textContent;
}

/** POST /v1/models/{name}/sanity, then follow its job. */
async function runSanity(name) {
  const run = { active: true, job: null, jobId: null, error: null };
  state.sanityRuns.set(name, run);
  renderSanity();
  try {
    const { data } = await api.postJson(`/v1/models/${encodeURIComponent(name)}/sanity`, {});
    await pollSanity(name, run, data);
  } catch (err) {
    run.error = err instanceof ApiError ? err.message : `Something went wrong in the page: ${err.message}`;
  }
  run.active = false;
  renderSanity();
}

async function followSanity(name, job) {
  const run = { active: true, job, jobId: job.id, error: null };
  state.sanityRuns.set(name, run);
  renderSanity();
  try {
    await pollSanity(name, run, (await api.get(`/v1/jobs/${encodeURIComponent(job.id)}`)).data);
  } catch (err) {
    run.error = err instanceof ApiError ? err.message : `Something went wrong in the page: ${err.message}`;
  }
  run.active = false;
  renderSanity();
}

async function pollSanity(name, run, job) {
  run.jobId = job.id;
  for (;;) {
    run.job = job;
    renderSanity();
    if (job.status === "succeeded" || job.status === "done") {
      await refreshModels(name, job.result);
      return;
    }
    if (job.status === "failed") {
      const message = job.error && job.error.message ? job.error.message : "no details";
      throw new ApiError(`The sanity check failed. ${capitalize(message)}${/[.!?]$/.test(message) ? "" : "."}`, 200);
    }
    if (job.status === "cancelled") {
      run.error = "The sanity check was cancelled.";
      await refreshModels(name, null);
      return;
    }
    await sleep(SANITY_POLL_MS);
    job = (await api.get(`/v1/jobs/${encodeURIComponent(job.id)}`)).data;
  }
}

/** Reload GET /v1/models (keeping the form as it is); the finished report stands in if the list lags. */
async function refreshModels(name, report) {
  try {
    state.models = (await api.get("/v1/models")).data;
  } catch (err) { /* keep the list we have */ }
  const model = state.models.find((m) => m.name === name);
  if (model && report && report.methods && !(model.sanity && model.sanity.status === "done")) {
    const methods = Object.fromEntries(Object.entries(report.methods)
      .map(([method, r]) => [method, { verdict: r.verdict, reason: r.reason }]));
    model.sanity = { status: "done", job_id: null, methods };
  }
}

// ---------------------------------------------------------------------------------------------- image

function wireImageInput() {
  const input = $("#image-input");
  const zone = $("#drop-zone");
  input.addEventListener("change", () => input.files[0] && useFile(input.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (!file) return;
    try {
      input.files = event.dataTransfer.files;
    } catch (err) { /* older browsers: the file is still used */ }
    useFile(file);
  });
  // A file dropped beside the zone must not make the browser leave the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

function fitWithin(width, height, longest) {
  const scale = Math.min(1, longest / Math.max(width, height));
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

async function useFile(file) {
  showFormError("");
  const stem = (file.name || "image").replace(/\.[^.]*$/, "") || "image";
  let display = null;
  let width = 0;
  let height = 0;
  try {
    // Decoded once at full size for its dimensions, then kept only as a small bitmap for drawing.
    const full = await createImageBitmap(file, { imageOrientation: "from-image" });
    [width, height] = [full.width, full.height];
    const [w, h] = fitWithin(width, height, DISPLAY_MAX);
    display = await createImageBitmap(full, { resizeWidth: w, resizeHeight: h, resizeQuality: "high" });
    full.close();
  } catch (err) {
    display = null; // a format the server reads but this browser does not (TIFF): maps are shown alone
  }
  state.image = { file, stem, width, height, display };
  const preview = $("#preview");
  const info = $("#image-info");
  if (display) {
    const [w, h] = fitWithin(display.width, display.height, 600);
    preview.width = w;
    preview.height = h;
    preview.getContext("2d").drawImage(display, 0, 0, w, h);
    preview.setAttribute("aria-label", `The chosen image, ${file.name}`);
    preview.hidden = false;
    info.textContent = `${file.name}: ${width} × ${height} pixels, ${formatBytes(file.size)}`;
  } else {
    preview.hidden = true;
    info.textContent = `${file.name} (${formatBytes(file.size)}): this browser cannot show it; the server may still read it.`;
  }
  updateRunButton();
}

// ---------------------------------------------------------------------------------------------- run

function onRun(event) {
  event.preventDefault();
  showFormError("");
  if (!state.image) return showFormError("Choose an image first.");
  const methods = checkedMethods();
  if (!methods.length) return showFormError("Choose at least one method.");
  const requests = [];
  try {
    for (const method of methods) requests.push([method, readParams(method)]);
  } catch (err) {
    return showFormError(err.message);
  }
  for (const card of state.cards.values()) abandon(card);
  state.cards.clear();
  $("#cards").replaceChildren();
  $("#results-empty").hidden = true;
  const common = { model: $("#model-select").value, size: $("#full-size").checked ? "original" : "input",
                   metrics: $("#metrics").checked, image: state.image };
  for (const [method, params] of requests) {
    const card = makeCard(method, { ...common, params });
    state.cards.set(method.name, card);
    $("#cards").append(card.node);
    explain(card, null);
  }
}

// Passes per image: the product of the method's cost factors (parameters), as the server counts them.
function estimatedPasses(method, params) {
  const defaults = (method.parameters && method.parameters.properties) || {};
  return (method.cost_factors || []).reduce((total, name) => {
    const value = params[name] ?? unwrap(defaults[name] || {}).default ?? 1;
    return total * Number(value);
  }, 1);
}

// Iterative methods always run as a job (progress and cancel); others once they are long.
function runsAsJob(method, request) {
  const metricsPasses = request.metrics ? 4 * (METRICS_STEPS - 1) + 1 : 0;
  return method.iterative || estimatedPasses(method, request.params) + metricsPasses >= JOB_PASSES;
}

function makeCard(method, request) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.method = method.name;
  node.setAttribute("aria-label", method.title);
  $(".card-title", node).textContent = method.title;
  const card = { method, request, node, token: 0, jobId: null, map: null, gray: null, result: null };
  $(".cancel", node).addEventListener("click", () => cancel(card));
  $(".download-overlay", node).addEventListener("click", () => downloadOverlay(card));
  $(".download-npy", node).addEventListener("click", () => downloadNpy(card));
  $(".heat", node).style.opacity = state.opacity;
  $(".base", node).setAttribute("aria-label", `${method.title} overlay (not computed yet)`);
  $(".raw", node).setAttribute("aria-label", `${method.title} map (not computed yet)`);
  // the verdict of the sanity report on this method, for the model it runs on
  const verdict = sanityVerdict(state.models.find((m) => m.name === request.model), method.name);
  const line = $(".card-sanity", node);
  if (verdict) {
    const badge = el("span", { className: "badge" });
    sanityBadge(badge, verdict);
    line.append(badge);
    if (verdict.verdict !== "pass") line.append(` ${verdict.reason || "no reason given"}`);
    line.hidden = false;
  }
  return card;
}

function setCardState(card, phase, text) {
  card.node.dataset.state = phase;
  $(".card-status", card.node).textContent = text;
}

function showCardError(card, message) {
  const node = $(".card-error", card.node);
  node.textContent = message || "";
  node.hidden = !message;
}

async function explain(card, target) {
  const token = ++card.token;
  const { method, request } = card;
  const form = new FormData();
  form.append("image", request.image.file, request.image.file.name || "image");
  if (request.model) form.append("model", request.model);
  form.append("outputs", request.metrics ? "png,npy,metrics" : "png,npy");
  form.append("size", request.size);
  if (target !== null && target !== undefined) form.append("target", String(target));
  // params.NAME: never taken for one of the request's own fields (Integrated Gradients' `method` for the job's)
  for (const [name, value] of Object.entries(request.params)) form.append(`params.${name}`, String(value));

  showCardError("");
  setCardState(card, "running", target === null ? "Running…" : `Explaining class ${target}…`);
  $(".job", card.node).hidden = true;
  for (const button of card.node.querySelectorAll(".top-k button, .downloads button")) button.disabled = true;
  const started = performance.now();
  try {
    const asJob = runsAsJob(method, request);
    if (asJob) form.append("method", method.name);
    const { status, data } = await api.post(asJob ? "/v1/jobs" : `/v1/explain/${method.name}`, form);
    if (token !== card.token) return;
    const body = status === 202 ? await followJob(card, token, data) : data;
    if (!body || token !== card.token) return;
    await showResult(card, body.results[0], performance.now() - started);
  } catch (err) {
    if (token !== card.token) return;
    setCardState(card, "error", "Failed");
    showCardError(card, err instanceof ApiError ? err.message : `Something went wrong in the page: ${err.message}`);
    $(".job", card.node).hidden = true;
    restoreButtons(card);
  }
}

/** Poll a job until it ends; returns its result, or null when cancelled or replaced. */
async function followJob(card, token, job) {
  card.jobId = job.id;
  const box = $(".job", card.node);
  box.hidden = false;
  $(".cancel", card.node).disabled = false;
  for (;;) {
    updateProgress(card, job);
    if (job.status === "succeeded") {
      card.jobId = null;
      $(".cancel", card.node).disabled = true;
      return job.result;
    }
    if (job.status === "failed") {
      card.jobId = null;
      const message = job.error && job.error.message ? job.error.message : "no details";
      throw new ApiError(`The job failed. ${message[0].toUpperCase()}${message.slice(1)}.`, 200, job.error?.code);
    }
    if (job.status === "cancelled") {
      card.jobId = null;
      $(".cancel", card.node).disabled = true;
      setCardState(card, "cancelled", "Cancelled");
      restoreButtons(card);
      return null;
    }
    setCardState(card, "running", job.status === "queued" ? "Queued…" : "Running…");
    await sleep(POLL_MS);
    if (token !== card.token) return null;
    job = (await api.get(`/v1/jobs/${job.id}`)).data;
    if (token !== card.token) return null;
  }
}

function updateProgress(card, job) {
  const bar = $(".job-progress", card.node);
  const { done, total } = job.progress;
  bar.max = Math.max(1, total);
  bar.value = Math.min(done, bar.max);
  const percent = total ? Math.round((100 * done) / total) : 0;
  bar.setAttribute("aria-valuetext", `${percent}%`);
  $(".job-count", card.node).textContent = `${done} / ${total} steps`;
}

async function cancel(card) {
  if (!card.jobId) return;
  $(".cancel", card.node).disabled = true;
  setCardState(card, "running", "Cancelling…");
  try {
    const { data } = await api.delete(`/v1/jobs/${card.jobId}`);
    updateProgress(card, data);
  } catch (err) {
    showCardError(card, err.message);
  }
}

/** A card being replaced: stop following it, and cancel its job on the server. */
function abandon(card) {
  card.token++;
  if (card.jobId) api.delete(`/v1/jobs/${card.jobId}`).catch(() => {});
  card.jobId = null;
}

function restoreButtons(card) {
  for (const button of card.node.querySelectorAll(".top-k button")) button.disabled = false;
  $(".download-overlay", card.node).disabled = !card.gray;
  $(".download-npy", card.node).disabled = !card.result?.map?.npy;
}

// ---------------------------------------------------------------------------------------------- results

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** The map scaled (bilinear) to width x height, as one byte per pixel. */
function scaledGray(bitmap, width, height) {
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, width, height);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const gray = new Uint8Array(width * height);
  for (let i = 0, j = 0; i < gray.length; i++, j += 4) gray[i] = rgba[j];
  return gray;
}

async function showResult(card, result, roundTripMs) {
  const node = card.node;
  const image = card.request.image;
  const bitmap = await createImageBitmap(new Blob([base64Bytes(result.map.png)], { type: "image/png" }));
  const [w, h] = image.display ? [image.display.width, image.display.height]
                               : fitWithin(result.map.width, result.map.height, DISPLAY_MAX);
  if (card.map) card.map.close();
  card.map = bitmap;
  card.result = result;
  card.gray = scaledGray(bitmap, w, h);

  const base = $(".base", node);
  const heat = $(".heat", node);
  const raw = $(".raw", node);
  for (const canvas of [base, heat, raw]) [canvas.width, canvas.height] = [w, h];
  const ctx = base.getContext("2d");
  if (image.display) ctx.drawImage(image.display, 0, 0, w, h);
  else ctx.clearRect(0, 0, w, h);
  paintHeat(card);
  const rawCtx = raw.getContext("2d");
  rawCtx.imageSmoothingQuality = "high";
  rawCtx.drawImage(bitmap, 0, 0, w, h);
  base.setAttribute("aria-label", `${card.method.title} overlay for class ${result.label}`);
  raw.setAttribute("aria-label", `${card.method.title} map for class ${result.label}, bright is important`);

  renderPredictions(card, result);
  $(".explained", node).textContent = `${result.label} (class ${result.target}), probability ${percent(result.probability)}`;
  fillList($(".timing", node), [["queue", `${result.timing_ms.queue.toFixed(1)} ms`],
                                ["compute", `${result.timing_ms.compute.toFixed(1)} ms`],
                                ["round trip", `${roundTripMs.toFixed(0)} ms`],
                                ["map", `${result.map.width} × ${result.map.height}`]]);
  const diagnostics = Object.entries(result.diagnostics || {});
  fillList($(".diagnostics", node), diagnostics.length ? diagnostics.map(([k, v]) => [k, formatValue(v)])
                                                       : [["none", "this method reports none"]]);
  renderMetrics(card, result.metrics);
  restoreButtons(card);
  base.dataset.rendered = "true";
  setCardState(card, "done", `Done in ${(roundTripMs / 1000).toFixed(1)} s`);
}

/** The per-map metrics in plain words, and the deletion curve against a random order as a small plot. */
function renderMetrics(card, metrics) {
  const box = $(".faithfulness", card.node);
  box.hidden = !metrics;
  if (!metrics) return;
  const figure = (v) => (typeof v === "number" ? v.toFixed(2) : "?");
  $(".deletion", box).textContent = `Deleting the top pixels first: class probability area ${figure(metrics.deletion_auc)} `
    + `vs ${figure(metrics.deletion_auc_random)} for a random order (lower = more faithful)`;
  $(".insertion", box).textContent = `Inserting the top pixels first: class probability area ${figure(metrics.insertion_auc)} `
    + `vs ${figure(metrics.insertion_auc_random)} for a random order (higher = more faithful)`;
  const stability = $(".stability", box);
  stability.hidden = typeof metrics.stability !== "number";
  stability.textContent = stability.hidden ? ""
    : `Stability ${figure(metrics.stability)} (rank correlation of two halves of the samples)`;
  $(".metric-settings", box).textContent = `${metrics.steps} steps; deleted pixels replaced by ${metrics.replacement}.`;
  const curve = $(".curve", box);
  curve.replaceChildren();
  if (Array.isArray(metrics.deletion_curve) && metrics.deletion_curve.length > 1) {
    curve.append(curvePlot(`curve-${card.method.name}`, metrics.deletion_curve, metrics.deletion_curve_random || [],
      `Deletion curve of ${card.method.title}: the class probability as the top pixels are deleted first `
      + `(area ${figure(metrics.deletion_auc)}) and in a random order (area ${figure(metrics.deletion_auc_random)})`));
  }
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

/** Two curves of K+1 probabilities over x = k/K, on axes 0-1, with a legend on the right. */
function curvePlot(id, curve, random, title) {
  const [width, height, left, top, plotW, plotH] = [280, 150, 30, 8, 160, 110];
  const x = (t) => (left + t * plotW).toFixed(1);
  const y = (p) => (top + (1 - Math.min(1, Math.max(0, p))) * plotH).toFixed(1);
  const points = (values) => values.map((p, k) => `${x(k / (values.length - 1))},${y(p)}`).join(" ");
  const bottom = top + plotH;
  const text = (content, attributes) => svg("text", attributes, content);
  const legend = (row, cls, label) => [
    svg("line", { class: cls, x1: left + plotW + 12, x2: left + plotW + 32, y1: top + 10 + row * 18, y2: top + 10 + row * 18 }),
    text(label, { x: left + plotW + 36, y: top + 14 + row * 18 })];
  const plot = svg("svg", { class: "curve-plot", viewBox: `0 0 ${width} ${height}`, role: "img",
                            "aria-labelledby": `${id}-title` },
    svg("title", { id: `${id}-title` }, title),
    svg("path", { class: "axis", d: `M${left},${top} V${bottom} H${left + plotW}` }),
    text("1", { x: left - 5, y: top + 4, "text-anchor": "end" }),
    text("0", { x: left - 5, y: bottom + 4, "text-anchor": "end" }),
    text("0", { x: left, y: bottom + 14, "text-anchor": "middle" }),
    text("1", { x: left + plotW, y: bottom + 14, "text-anchor": "middle" }),
    text("fraction of pixels deleted", { x: left + plotW / 2, y: bottom + 26, "text-anchor": "middle" }),
    text("probability", { x: 10, y: top + plotH / 2, "text-anchor": "middle",
                          transform: `rotate(-90 10 ${top + plotH / 2})` }),
    svg("polyline", { class: "curve-random", points: points(random) }),
    svg("polyline", { class: "curve-map", points: points(curve) }),
    ...legend(0, "curve-map", "top first"),
    ...legend(1, "curve-random", "random"));
  return plot;
}

function paintHeat(card) {
  if (!card.gray) return;
  const heat = $(".heat", card.node);
  const ctx = heat.getContext("2d");
  const pixels = ctx.createImageData(heat.width, heat.height);
  colorize(card.gray, lookupTable(state.colormap), pixels.data);
  ctx.putImageData(pixels, 0, 0);
  heat.dataset.colormap = state.colormap;
}

function renderPredictions(card, result) {
  const list = $(".top-k", card.node);
  list.replaceChildren();
  for (const c of result.top_k) {
    const button = el("button", { type: "button" },
                      el("span", { className: "label", textContent: c.label }),
                      el("span", { className: "prob", textContent: percent(c.probability) }),
                      el("span", { className: "bar" }));
    $(".bar", button).style.width = `${Math.max(1, c.probability * 100)}%`;
    button.dataset.index = c.index;
    button.setAttribute("aria-pressed", String(c.index === result.target));
    button.setAttribute("aria-label", `${c.label}, ${percent(c.probability)}${c.index === result.target ? ", explained" : ", explain this class"}`);
    button.addEventListener("click", () => {
      if (c.index !== card.result?.target) explain(card, c.index);
    });
    list.append(el("li", {}, button));
  }
}

function fillList(dl, pairs) {
  dl.replaceChildren();
  for (const [key, value] of pairs) dl.append(el("dt", { textContent: key }), el("dd", { textContent: value }));
}

// ---------------------------------------------------------------------------------------------- display

function wireDisplayControls() {
  const select = $("#colormap-select");
  const slider = $("#opacity");
  select.addEventListener("change", () => {
    state.colormap = select.value;
    for (const card of state.cards.values()) paintHeat(card);
  });
  slider.addEventListener("input", () => {
    state.opacity = Number(slider.value);
    $("#opacity-value").textContent = percent(state.opacity, 0);
    for (const card of state.cards.values()) $(".heat", card.node).style.opacity = state.opacity;
  });
}

// ---------------------------------------------------------------------------------------------- downloads

function save(blob, name) {
  const link = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

/** The overlay at the photo's full size, in the colour map and opacity on screen. */
async function downloadOverlay(card) {
  const image = card.request.image;
  const button = $(".download-overlay", card.node);
  button.disabled = true;
  try {
    let canvas;
    if (image.display) {
      const full = await createImageBitmap(image.file, { imageOrientation: "from-image" });
      canvas = new OffscreenCanvas(full.width, full.height);
      canvas.getContext("2d").drawImage(full, 0, 0);
      full.close();
    } else {
      canvas = new OffscreenCanvas(card.result.map.width, card.result.map.height);
    }
    const ctx = canvas.getContext("2d");
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    blend(pixels.data, scaledGray(card.map, canvas.width, canvas.height), lookupTable(state.colormap),
          image.display ? state.opacity : 1);
    ctx.putImageData(pixels, 0, 0);
    const blob = await canvas.convertToBlob({ type: "image/png" });
    save(blob, `${image.stem}-${card.method.name}-${card.result.target}-overlay.png`);
  } catch (err) {
    showCardError(card, `Could not make the overlay PNG: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

function downloadNpy(card) {
  const { map, target } = card.result;
  const blob = new Blob([base64Bytes(map.npy)], { type: "application/octet-stream" });
  save(blob, `${card.request.image.stem}-${card.method.name}-${target}-map-${map.height}x${map.width}.npy`);
}

// ---------------------------------------------------------------------------------------------- helpers

function capitalize(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function percent(p, digits = 1) {
  return `${(100 * p).toFixed(digits)}%`;
}

function formatBytes(n) {
  return n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB` : `${Math.max(1, Math.round(n / 1024))} kB`;
}

function formatValue(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  if (typeof v === "boolean") return v ? "yes" : "no";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

start();
