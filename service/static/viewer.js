// The saliency viewer: one image, one model, several methods compared side by side over it, with one class
// picker, one colour bar and one zoom for every map. The display (view, colours, opacity, zoom) is applied in
// the page, on canvases: changing it sends no request.
import { Api, ApiError } from "./api.js";
import { COLORMAP_NAMES } from "./colormaps.js";
import { base64Bytes, fitWithin, parseNpy, scaledGray, signedAt, signedMap } from "./maps.js";
import { fillList, renderDiagnostics, renderMetrics } from "./figures.js";
import { buildMethods, changedParams, checkedMethods as ticked, fillLayers, readParams } from "./form.js";
import { drawBoxes } from "./plots.js";
import { SanityPanel, sanityBadge, sanityVerdict } from "./sanity.js";
import { drawColorbar, overlayBlob, paintCard } from "./render.js";
import { readLink, writeLink } from "./share.js";
import { capitalize, estimate, formatCount, formatDuration, percent } from "./words.js";
import { SyncZoom } from "./zoom.js";

const DISPLAY_MAX = 960; // longest side of the image as drawn in the page (a 2000 x 1500 photo is drawn at 960 x 720)
const JOB_PASSES = 512; // passes per image from which a request runs as a job (progress and Cancel)
const JOB_SECONDS = 10; // ... or an estimated time from which it does
const POLL_MS = 300;
const HEALTH_MS = Number(window.SALIENCY_HEALTH_MS) || 5000; // how often the header asks /readyz
const HISTORY_KEEP = 6;
const DEFAULT_DISPLAY = { cmap: COLORMAP_NAMES[0], view: "heat", top: 10, opacity: 0.8, photo: true };

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const state = {
  models: [],
  methods: [],
  timings: null, // GET /v1/timings: the server's recent seconds per pass
  image: null, // {file, name, stem, width, height, display: ImageBitmap | null}
  run: null, // the comparison on screen: {image, model, size, metrics, target, top, cards: Map name -> card}
  history: [],
  display: { ...DEFAULT_DISPLAY },
  linkTarget: null, // the class a link named, for the next comparison
  catalogLoaded: false,
};

const api = new Api(() => $("#api-key").value.trim());
const zoom = new SyncZoom(showZoom);
const sanity = new SanityPanel({
  api, currentModel, models: () => state.models, setModels: (models) => { state.models = models; },
});

// ---------------------------------------------------------------------------------------------- start

async function start() {
  const key = sessionStorage.getItem("saliency-api-key");
  if (key) $("#api-key").value = key;
  $("#api-key").addEventListener("change", () => {
    sessionStorage.setItem("saliency-api-key", $("#api-key").value.trim());
    if (!state.catalogLoaded) loadCatalog(readLink(location.hash));
  });
  const link = readLink(location.hash);
  wireImageInput();
  wireDisplay(link.display);
  wireClasses();
  $("#run-form").addEventListener("submit", onRun);
  $("#method-list").addEventListener("change", onFormChange);
  $("#method-list").addEventListener("input", onFormChange);
  $("#model-select").addEventListener("change", onModelChange);
  for (const id of ["#full-size", "#metrics"]) $(id).addEventListener("change", onFormChange);
  $("#copy-link").addEventListener("click", copyLink);
  $("#history-clear").addEventListener("click", () => {
    state.history = [];
    renderHistory();
  });
  if (link.target !== undefined) state.linkTarget = link.target;
  if (link.size) $("#full-size").checked = link.size === "original";
  if (link.metrics !== undefined) $("#metrics").checked = link.metrics;
  await waitReady();
  await loadCatalog(link);
  watchHealth();
}

function setServerStatus(text, ok = true) {
  const node = $("#server-status");
  node.textContent = text;
  node.dataset.ok = String(ok);
}

/** /readyz in words: null when ready. */
async function readiness() {
  try {
    const response = await fetch("/readyz", { headers: { Accept: "application/json" }, cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (response.ok) return null;
    return { text: body.error ? `The server could not load its models: ${body.error}`
                              : "The server is starting (loading models)…", ok: !body.error };
  } catch (err) {
    return { text: `Cannot reach the server (since ${new Date().toLocaleTimeString()}); retrying…`, ok: false };
  }
}

async function waitReady() {
  for (;;) {
    const problem = await readiness();
    if (!problem) return;
    setServerStatus(problem.text, problem.ok);
    await sleep(2000);
  }
}

/** The header follows the server: it says so within HEALTH_MS when the server stops, and again when it is
 * back (the time of the first failed check stays in the line while it lasts). */
async function watchHealth() {
  let down = false;
  for (;;) {
    await sleep(HEALTH_MS);
    const problem = await readiness();
    if (problem) {
      if (!down || problem.ok) setServerStatus(problem.text, problem.ok);
      down = true;
    } else if (down || !state.catalogLoaded) {
      down = false;
      if (state.catalogLoaded) setReady();
      else await loadCatalog(readLink(location.hash));
    }
  }
}

function setReady() {
  const ready = state.models.filter((m) => m.available);
  const device = ready.length ? ready[0].device : "no device";
  setServerStatus(`Ready: ${ready.length} model${ready.length === 1 ? "" : "s"} on ${device}`);
}

async function loadCatalog(link) {
  try {
    const [models, methods] = await Promise.all([api.get("/v1/models"), api.get("/v1/methods")]);
    state.models = models.data;
    state.methods = methods.data;
  } catch (err) {
    setServerStatus(err.message, false);
    return;
  }
  state.catalogLoaded = true;
  setReady();
  buildModelSelect(link.model);
  buildMethods(state.methods, link, currentModel());
  onModelChange();
  await refreshTimings();
}

async function refreshTimings() {
  try {
    state.timings = (await api.get("/v1/timings")).data;
  } catch (err) {
    state.timings = null; // a server without GET /v1/timings: passes only, no time
  }
  updateCosts();
}

// ---------------------------------------------------------------------------------------------- form

function buildModelSelect(wanted) {
  const select = $("#model-select");
  select.replaceChildren();
  for (const m of state.models) {
    const kind = m.task === "detection" ? " (detector)" : "";
    const option = el("option", { value: m.name, disabled: !m.available,
                                  textContent: m.available ? `${m.name}${kind}` : `${m.name} (unavailable)` });
    option.selected = wanted ? m.name === wanted && m.available : Boolean(m.default);
    select.append(option);
  }
}

function currentModel() {
  return state.models.find((m) => m.name === $("#model-select").value);
}

function onModelChange() {
  const model = currentModel();
  const info = $("#model-info");
  info.textContent = !model ? ""
    : model.available ? `${model.description || model.architecture}; input ${(model.input_size || []).join(" × ")}, `
                        + `${model.num_classes} classes, on ${model.device}.`
      : `Unavailable: ${model.reason}`;
  for (const select of document.querySelectorAll("select[data-param='layer']")) fillLayers(select, model);
  // Methods the model's self-test refused (GET /v1/models `methods_not_applicable`) cannot be ticked.
  for (const option of document.querySelectorAll("#method-list .method-option")) {
    const name = option.dataset.method;
    const reason = model && model.methods && !model.methods.includes(name)
      ? (model.methods_not_applicable || {})[name] || "does not apply to this model" : "";
    const check = $("input[name='method']", option);
    check.disabled = Boolean(reason);
    if (reason) check.checked = false;
    const note = $(".not-applicable", option);
    note.hidden = !reason;
    note.textContent = reason ? `Not for ${model.name}: ${reason}` : "";
    option.dataset.applicable = String(!reason);
  }
  sanity.render();
  onFormChange();
}

function checkedMethods() {
  return ticked(state.methods);
}

function metricsPasses(method) {
  return $("#metrics").checked ? method.metrics_forwards_at_defaults || 0 : 0;
}

function estimateFor(method, params) {
  return estimate(method, params, { timings: state.timings, model: $("#model-select").value,
                                    metricsPasses: metricsPasses(method) });
}

// Iterative methods always run as a job (progress and cancel); others once they are long.
function runsAsJob(method, cost) {
  return Boolean(method.iterative) || cost.passes >= JOB_PASSES || (cost.seconds ?? 0) >= JOB_SECONDS;
}

function onFormChange() {
  updateCosts();
  for (const method of state.methods) {
    const summary = document.getElementById(`params-${method.name}-summary`);
    if (!summary) continue;
    const changed = Object.entries(changedParams(method));
    summary.textContent = changed.length ? `Parameters: ${changed.map(([k, v]) => `${k} ${v}`).join(", ")}`
                                         : "Parameters: defaults";
  }
  updateRunButton();
  writeLinkNow();
}

/** Each method's cost before it runs: passes and, from the server's recent figures, the time. */
function updateCosts() {
  let passes = 0;
  let seconds = 0;
  let unknown = 0;
  const checked = checkedMethods();
  for (const method of state.methods) {
    const line = document.getElementById(`method-${method.name}-cost`);
    if (!line) continue;
    const cost = estimateFor(method, readParams(method, false));
    line.textContent = `${capitalize(cost.text)}${runsAsJob(method, cost) ? "; runs as a job (progress, Cancel)" : ""}.`;
    if (checked.includes(method)) {
      passes += cost.passes;
      if (cost.seconds === null) unknown++;
      else seconds += cost.seconds;
    }
  }
  const total = $("#run-cost");
  if (!checked.length) total.textContent = "";
  else {
    const time = unknown === checked.length ? "the time is not measured on this server yet"
      : `about ${formatDuration(seconds)}${unknown ? " for those measured" : ""}`;
    total.textContent = `${checked.length} method${checked.length === 1 ? "" : "s"}: ${formatCount(passes)} `
                      + `pass${passes === 1 ? "" : "es"}, ${time}.`;
  }
}

function updateRunButton() {
  $("#run-button").disabled = !(state.image && state.methods.length && checkedMethods().length);
}

function showFormError(message) {
  const node = $("#form-error");
  node.textContent = message || "";
  node.hidden = !message;
}

// ---------------------------------------------------------------------------------------------- link

function linkSettings() {
  const display = Object.fromEntries(Object.entries(state.display).filter(([k, v]) => v !== DEFAULT_DISPLAY[k])
    .map(([k, v]) => [k, typeof v === "boolean" ? (v ? 1 : 0) : v]));
  const methods = checkedMethods();
  return {
    model: $("#model-select").value || undefined, methods: methods.map((m) => m.name),
    params: Object.fromEntries(methods.map((m) => [m.name, changedParams(m)])),
    size: $("#full-size").checked ? "original" : "input", metrics: $("#metrics").checked, display,
    target: state.run ? state.run.target : state.linkTarget,
  };
}

/** The address always holds the settings on screen, so it can be shared as it is. */
function writeLinkNow() {
  if (!state.catalogLoaded) return;
  history.replaceState(null, "", writeLink(linkSettings()));
}

async function copyLink() {
  writeLinkNow();
  const status = $("#link-status");
  try {
    await navigator.clipboard.writeText(location.href);
    status.textContent = "Link copied: it restores these settings, not the image.";
  } catch (err) {
    status.textContent = `Copy this link (it restores these settings, not the image): ${location.href}`;
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

async function useFile(file) {
  showFormError("");
  const name = file.name || "image";
  const stem = name.replace(/\.[^.]*$/, "") || "image";
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
  state.image = { file, name, stem, width, height, display };
  const preview = $("#preview");
  const info = $("#image-info");
  if (display) {
    const [w, h] = fitWithin(display.width, display.height, 600);
    preview.width = w;
    preview.height = h;
    preview.getContext("2d").drawImage(display, 0, 0, w, h);
    preview.setAttribute("aria-label", `The chosen image, ${name}`);
    preview.hidden = false;
    info.textContent = `${name}: ${width} × ${height} pixels, ${formatBytes(file.size)}`;
  } else {
    preview.hidden = true;
    info.textContent = `${name} (${formatBytes(file.size)}): this browser cannot show it; the server may still read it.`;
  }
  // The maps on screen were of the last image: they go to the history, and the comparison starts afresh.
  if (state.run) {
    archive(state.run);
    state.run = null;
    $("#results-empty").textContent = `New image ${name}: press Explain to compare the methods on it.`;
    $("#results-empty").hidden = false;
  }
  updateRunButton();
}

// ---------------------------------------------------------------------------------------------- run

function busy() {
  return Boolean(state.run) && [...state.run.cards.values()].some((c) => c.node.dataset.state === "running");
}

/** The Explain button says what runs; it keeps its focus (it is never disabled while running). */
function updateBusy() {
  const button = $("#run-button");
  const cards = state.run ? [...state.run.cards.values()] : [];
  const running = cards.filter((c) => c.node.dataset.state === "running").length;
  button.classList.toggle("busy", running > 0);
  $("#results").setAttribute("aria-busy", String(running > 0));
  if (running) {
    button.setAttribute("aria-disabled", "true");
    button.textContent = `Explaining… ${cards.length - running} of ${cards.length} done`;
  } else {
    button.removeAttribute("aria-disabled");
    button.textContent = "Explain";
  }
}

function onRun(event) {
  event.preventDefault();
  if (busy()) return;
  showFormError("");
  if (!state.image) return showFormError("Choose an image first.");
  const methods = checkedMethods();
  if (!methods.length) return showFormError("Choose at least one method.");
  let requests;
  try {
    requests = methods.map((method) => {
      const params = readParams(method);
      return { method, params, cost: estimateFor(method, params) };
    });
  } catch (err) {
    return showFormError(err.message);
  }
  // Cheap methods first: their cards come first and their requests are queued first.
  requests.sort((a, b) => a.cost.passes - b.cost.passes);
  const common = { image: state.image, model: $("#model-select").value,
                   size: $("#full-size").checked ? "original" : "input", metrics: $("#metrics").checked };
  let run = state.run;
  if (!(run && run.image === common.image && run.model === common.model && run.size === common.size
        && run.metrics === common.metrics)) {
    if (run) archive(run);
    run = newRun(common);
  }
  // Running again keeps each map whose request has not changed; the others (changed, failed, new) run.
  const cards = new Map();
  for (const { method, params, cost } of requests) {
    const signature = JSON.stringify(params);
    const old = run.cards.get(method.name);
    if (old && old.signature === signature && ["done", "running"].includes(old.node.dataset.state)) {
      cards.set(method.name, old);
      continue;
    }
    if (old) dropCard(old);
    cards.set(method.name, makeCard(run, method, params, signature, cost));
  }
  for (const [name, card] of run.cards) if (!cards.has(name)) dropCard(card);
  run.cards = cards;
  $("#cards").replaceChildren(run.photo, ...[...cards.values()].map((c) => c.node));
  $("#results-empty").hidden = true;
  for (const card of cards.values()) if (card.node.dataset.state !== "done" && card.node.dataset.state !== "running") explain(card, run.target);
  updateBusy();
  writeLinkNow();
  scrollToResults();
}

/** The results come into view (on a phone they are below the form); the focus stays where it was. */
function scrollToResults() {
  const heading = $("#results-heading");
  const box = heading.getBoundingClientRect();
  const header = $(".top");
  const covered = getComputedStyle(header).position === "sticky" ? header.offsetHeight : 0; // wide screens
  if (box.top >= covered && box.bottom <= window.innerHeight) return;
  const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  heading.scrollIntoView({ block: "start", behavior: smooth ? "smooth" : "auto" });
}

let runs = 0;
function newRun(common) {
  const run = { ...common, id: ++runs, target: state.linkTarget ?? null, top: null, cards: new Map(), photo: null };
  state.linkTarget = null;
  state.run = run;
  const node = $("#photo-template").content.firstElementChild.cloneNode(true);
  const [w, h] = displaySize(run);
  const base = $(".base", node);
  [base.width, base.height] = [w, h];
  if (run.image.display) base.getContext("2d").drawImage(run.image.display, 0, 0, w, h);
  base.setAttribute("aria-label", `The photo ${run.image.name}`);
  $(".card-context", node).textContent = `${run.image.name}, ${run.image.width} × ${run.image.height}`;
  $(".viewport", node).setAttribute("aria-label", `The photo ${run.image.name}: + and − zoom every map, arrows move`);
  zoom.add($(".viewport", node));
  run.photo = node;
  zoom.reset();
  renderClasses();
  renderContext();
  return run;
}

/** The size the maps are drawn at: the photo's as shown, or the map's when the browser cannot show the photo. */
function displaySize(run, shown) {
  if (run.image.display) return [run.image.display.width, run.image.display.height];
  const model = state.models.find((m) => m.name === run.model);
  if (shown) return fitWithin(shown.width, shown.height, DISPLAY_MAX);
  const [h, w] = (model && model.input_size) || [224, 224];
  return [w, h];
}

function makeCard(run, method, params, signature, cost) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.method = method.name;
  node.setAttribute("aria-label", method.title);
  $(".card-title", node).textContent = method.title;
  const card = { run, method, params, signature, cost, node, token: 0, jobId: null, map: null, gray: null,
                 signed: null, signedMap: null, result: null, shown: null, detection: null, width: 0, height: 0 };
  $(".cancel", node).addEventListener("click", () => cancel(card));
  $(".retry", node).addEventListener("click", () => explain(card, run.target));
  $(".download-overlay", node).addEventListener("click", () => downloadOverlay(card));
  $(".download-npy", node).addEventListener("click", () => downloadNpy(card));
  const [w, h] = displaySize(run);
  for (const canvas of node.querySelectorAll("canvas")) [canvas.width, canvas.height] = [w, h];
  if (run.image.display) $(".base", node).getContext("2d").drawImage(run.image.display, 0, 0, w, h);
  $(".heat", node).setAttribute("aria-label", `${method.title} map (not computed yet)`);
  $(".viewport", node).setAttribute("aria-label", `${method.title} map: + and − zoom every map, arrows move`);
  $(".card-context", node).textContent = cardContext(card);
  zoom.add($(".viewport", node));
  // the verdict of the sanity report on this method, for the model it runs on
  const verdict = sanityVerdict(state.models.find((m) => m.name === run.model), method.name);
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

/** What a card shows, in one line: its image, its model and its class (a detector's: its box). */
function cardContext(card) {
  const { run, result } = card;
  let what;
  if (result && Array.isArray(result.detections) && (card.detection !== null || !result.map)) {
    const d = result.detections[card.detection];
    what = d ? `box ${card.detection + 1} of ${result.detections.length}: ${d.label} (${percent(d.score)})`
      : "no detections";
  } else {
    what = result ? `class ${result.target} ${result.label} (${percent(result.probability)})`
      : run.target === null ? "the top class" : `class ${run.target}`;
  }
  return `${run.image.name} · ${run.model} · ${what}`;
}

function renderContext() {
  const run = state.run;
  const node = $("#run-context");
  if (!run) {
    node.textContent = "";
    return;
  }
  const top = run.top && (run.top.find((c) => c.index === explainedClass(run)) || null);
  const what = top ? `class ${top.index} ${top.label}` : run.target === null ? "the top class" : `class ${run.target}`;
  node.textContent = `${run.image.name} · ${run.model} · ${what}`;
}

function dropCard(card) {
  abandon(card);
  zoom.remove($(".viewport", card.node));
  card.node.remove();
  if (card.map) card.map.close();
}

function setCardState(card, phase, text) {
  card.node.dataset.state = phase;
  $(".card-status", card.node).textContent = text;
  updateBusy();
}

function showProblem(card, message) {
  $(".card-error", card.node).textContent = message || "";
  $(".card-problem", card.node).hidden = !message;
}

async function explain(card, target) {
  const token = ++card.token;
  const { method, run, params } = card;
  const form = new FormData();
  form.append("image", run.image.file, run.image.name);
  if (run.model) form.append("model", run.model);
  // raw: the signed attribution, for the signed view (small for Grad-CAM, 3 x H x W floats for the gradients)
  form.append("outputs", run.metrics ? "png,npy,raw,metrics" : "png,npy,raw");
  form.append("size", run.size);
  if (target !== null && target !== undefined) form.append("target", String(target));
  // params.NAME: never taken for one of the request's own fields (Integrated Gradients' `method` for the job's)
  for (const [name, value] of Object.entries(params)) form.append(`params.${name}`, String(value));

  showProblem(card, "");
  setCardState(card, "running", target === null || target === undefined ? "Running…" : `Explaining class ${target}…`);
  $(".job", card.node).hidden = true;
  for (const button of card.node.querySelectorAll(".downloads button")) button.disabled = true;
  const started = performance.now();
  try {
    const asJob = runsAsJob(method, card.cost);
    if (asJob) form.append("method", method.name);
    const { status, data } = await api.post(asJob ? "/v1/jobs" : `/v1/explain/${method.name}`, form);
    if (token !== card.token) return;
    const body = status === 202 ? await followJob(card, token, data) : data;
    if (!body || token !== card.token) return;
    await showResult(card, body.results[0], performance.now() - started);
    refreshTimingsSoon();
  } catch (err) {
    if (token !== card.token) return;
    setCardState(card, "error", "Failed");
    showProblem(card, err instanceof ApiError ? err.message : `Something went wrong in the page: ${err.message}`);
    $(".job", card.node).hidden = true;
    restoreButtons(card);
  }
}

let timingsTimer = null;
function refreshTimingsSoon() {
  clearTimeout(timingsTimer);
  timingsTimer = setTimeout(refreshTimings, 300);
}

/** Poll a job until it ends; returns its result, or null when cancelled or replaced. */
async function followJob(card, token, job) {
  card.jobId = job.id;
  $(".job", card.node).hidden = false;
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
      throw new ApiError(`The job failed. ${capitalize(message)}.`, 200, job.error?.code);
    }
    if (job.status === "cancelled") {
      card.jobId = null;
      $(".cancel", card.node).disabled = true;
      setCardState(card, "cancelled", "Cancelled");
      restoreButtons(card);
      return null;
    }
    const { done, total } = job.progress;
    const left = card.cost.seconds && total ? ` (about ${formatDuration(card.cost.seconds * (1 - done / total))} left)` : "";
    setCardState(card, "running", job.status === "queued" ? "Queued…" : `Running…${left}`);
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
  bar.setAttribute("aria-valuetext", `${total ? Math.round((100 * done) / total) : 0}%`);
  $(".job-count", card.node).textContent = `${done} / ${total} steps`;
}

async function cancel(card) {
  if (!card.jobId) return;
  $(".cancel", card.node).disabled = true;
  setCardState(card, "running", "Cancelling…");
  try {
    updateProgress(card, (await api.delete(`/v1/jobs/${card.jobId}`)).data);
  } catch (err) {
    showProblem(card, err.message);
  }
}

/** A card being replaced: stop following it, and cancel its job on the server. */
function abandon(card) {
  card.token++;
  if (card.jobId) api.delete(`/v1/jobs/${card.jobId}`).catch(() => {});
  card.jobId = null;
  if (card.node.dataset.state === "running") card.node.dataset.state = "cancelled";
}

function restoreButtons(card) {
  $(".download-overlay", card.node).disabled = !card.gray;
  $(".download-npy", card.node).disabled = !card.shown?.npy;
}

// ---------------------------------------------------------------------------------------------- results

/** Show `shown` (a map of the API: the result's, or one detection's) on the card: its 8-bit PNG scaled to
 * the photo as drawn. No map (a detector that found nothing): the photo alone. */
async function showMap(card, shown) {
  if (card.map) card.map.close();
  card.map = card.gray = null;
  card.shown = shown || null;
  if (shown && shown.png) {
    card.map = await createImageBitmap(new Blob([base64Bytes(shown.png)], { type: "image/png" }));
    card.gray = scaledGray(card.map, card.width, card.height);
  }
}

async function showResult(card, result, roundTripMs) {
  const { node, run } = card;
  // A detector's result (docs/detection.md) has no map of its own: the first detection's is shown.
  const detections = Array.isArray(result.detections) ? result.detections : null;
  card.result = result;
  card.detection = !result.map && detections && detections.length ? 0 : null;
  const shown = result.map || (card.detection === null ? null : detections[0].map);
  const [w, h] = displaySize(run, shown);
  [card.width, card.height] = [w, h];
  await showMap(card, shown);
  card.signedMap = result.raw ? signedMap(parseNpy(base64Bytes(result.raw))) : null;
  card.signed = card.signedMap && card.signedMap.signed ? signedAt(card.signedMap, w, h) : null;
  for (const canvas of node.querySelectorAll("canvas")) {
    if (canvas.width !== w || canvas.height !== h) [canvas.width, canvas.height] = [w, h];
  }
  if (run.image.display) $(".base", node).getContext("2d").drawImage(run.image.display, 0, 0, w, h);
  paint(card);
  $(".heat", node).setAttribute("aria-label", `${card.method.title} map, ${cardContext(card)}`);
  $(".card-context", node).textContent = cardContext(card);

  if (!run.top && result.top_k) run.top = result.top_k;
  renderClasses();
  renderContext();
  const timing = result.timing_ms || {};
  const ms = (v) => (typeof v === "number" ? `${v.toFixed(1)} ms` : "—");
  fillList($(".timing", node), [["queue", ms(timing.queue)], ["compute", ms(timing.compute)],
                                ["round trip", `${roundTripMs.toFixed(0)} ms`],
                                ["map", shown ? `${shown.width} × ${shown.height}` : "none"]]);
  renderDiagnostics(node, result.diagnostics, card.method.diagnostics);
  renderMetrics(node, card.method, result.metrics);
  renderDetections(card);
  restoreButtons(card);
  $(".heat", node).dataset.rendered = "true";
  setCardState(card, "done", `Done in ${(roundTripMs / 1000).toFixed(1)} s`);
}

/** A detector's result (`detections: [{box: [x1, y1, x2, y2], label, score, map}]`, boxes in the photo's
 * pixels): its boxes over the image, and one button per box; picking one shows that box's map. */
function renderDetections(card) {
  const detections = card.result && Array.isArray(card.result.detections) ? card.result.detections : [];
  const layer = $(".boxes", card.node);
  const list = $(".detections", card.node);
  layer.toggleAttribute("hidden", !detections.length); // an <svg> has no `hidden` property, only the attribute
  list.hidden = !detections.length;
  if (!detections.length) return;
  // Boxes are in the upload's pixels; a photo the browser cannot decode has no size here: the results' own.
  const width = card.run.image.width || card.result.width || (card.shown && card.shown.width);
  const height = card.run.image.height || card.result.height || (card.shown && card.shown.height);
  const pick = (i) => selectDetection(card, i);
  drawBoxes(layer, detections, width, height, card.detection, pick);
  list.setAttribute("aria-label", `${card.method.title}: detections`);
  list.replaceChildren(el("span", { className: "hint", textContent: "Boxes:" }), ...detections.map((d, i) => {
    const button = el("button", { type: "button", textContent: `${d.label} ${percent(d.score, 0)}` });
    button.dataset.index = i;
    button.setAttribute("aria-pressed", String(i === card.detection));
    button.addEventListener("click", () => pick(i));
    return button;
  }));
}

async function selectDetection(card, index) {
  card.detection = index;
  await showMap(card, card.result.detections[index].map);
  card.signed = null; // a box's map comes without its signed attribution
  paint(card);
  restoreButtons(card);
  renderDetections(card);
  $(".card-context", card.node).textContent = cardContext(card);
  const focus = card.node.querySelector(`.detections button[data-index='${index}']`);
  if (focus) focus.focus();
}

// ---------------------------------------------------------------------------------------------- classes

/** The class every map explains (null target: the model's top class). */
function explainedClass(run) {
  if (run.target !== null && run.target !== undefined) return run.target;
  return run.top && run.top.length ? run.top[0].index : null;
}

function wireClasses() {
  const input = $("#class-input");
  const go = () => {
    const model = state.run && state.models.find((m) => m.name === state.run.model);
    const index = Number(input.value);
    const most = model && model.num_classes ? model.num_classes - 1 : Infinity;
    if (!Number.isInteger(index) || index < 0 || index > most) {
      input.setCustomValidity(`A class index from 0 to ${most}.`);
      input.reportValidity();
      return;
    }
    input.setCustomValidity("");
    chooseClass(index);
  };
  $("#class-go").addEventListener("click", go);
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      go();
    }
  });
}

/** One list for every map: the top-5 classes are the model's, the same whatever the method. The buttons are
 * built once per comparison and only their pressed state changes, so a class chosen with the keyboard keeps
 * the focus. */
function renderClasses() {
  const run = state.run;
  const box = $("#classes");
  box.hidden = !(run && run.top);
  if (box.hidden) return;
  const list = $("#top-k");
  if (list.dataset.run !== String(run.id)) {
    list.dataset.run = String(run.id);
    list.replaceChildren(...run.top.map((c) => {
      const button = el("button", { type: "button" },
                        el("span", { className: "label", textContent: c.label }),
                        el("span", { className: "prob", textContent: percent(c.probability) }),
                        el("span", { className: "bar" }));
      $(".bar", button).style.width = `${Math.max(1, c.probability * 100)}%`;
      button.dataset.index = c.index;
      button.addEventListener("click", () => chooseClass(c.index));
      return el("li", {}, button);
    }));
    const model = state.models.find((m) => m.name === run.model);
    if (model && model.num_classes) $("#class-input").max = model.num_classes - 1;
  }
  const explained = explainedClass(run);
  for (const button of list.querySelectorAll("button")) {
    const c = run.top.find((t) => String(t.index) === button.dataset.index);
    const on = c.index === explained;
    button.setAttribute("aria-pressed", String(on));
    button.setAttribute("aria-label", `${c.label}, ${percent(c.probability)}${on ? ", explained by every map" : ", explain this class with every method"}`);
  }
}

function chooseClass(index) {
  const run = state.run;
  if (!run) return;
  run.target = index;
  for (const card of run.cards.values()) {
    if (!(card.result && card.result.target === index && card.node.dataset.state === "done")) explain(card, index);
  }
  renderClasses();
  renderContext();
  writeLinkNow();
}

// ---------------------------------------------------------------------------------------------- display

function wireDisplay(fromLink) {
  const select = $("#colormap-select");
  for (const name of COLORMAP_NAMES) select.append(el("option", { value: name, textContent: name }));
  const d = state.display;
  if (COLORMAP_NAMES.includes(fromLink.cmap)) d.cmap = fromLink.cmap;
  if (["heat", "top", "signed"].includes(fromLink.view)) d.view = fromLink.view;
  const top = Number(fromLink.top);
  if (top >= 1 && top <= 50) d.top = Math.round(top);
  const opacity = Number(fromLink.opacity);
  if (fromLink.opacity !== undefined && opacity >= 0 && opacity <= 1) d.opacity = opacity;
  if (fromLink.photo !== undefined) d.photo = fromLink.photo !== "0";
  select.value = d.cmap;
  $("#view-select").value = d.view;
  $("#top-percent").value = d.top;
  $("#opacity").value = d.opacity;
  $("#photo-toggle").checked = d.photo;
  const changed = () => {
    d.cmap = select.value;
    d.view = $("#view-select").value;
    d.top = Number($("#top-percent").value);
    d.opacity = Number($("#opacity").value);
    d.photo = $("#photo-toggle").checked;
    repaintAll();
    writeLinkNow();
  };
  for (const id of ["#colormap-select", "#view-select", "#photo-toggle"]) $(id).addEventListener("change", changed);
  for (const id of ["#top-percent", "#opacity"]) $(id).addEventListener("input", changed);
  $("#zoom-in").addEventListener("click", () => zoom.zoomIn());
  $("#zoom-out").addEventListener("click", () => zoom.zoomOut());
  $("#zoom-reset").addEventListener("click", () => zoom.reset());
  repaintAll();
}

function showZoom(view) {
  $("#zoom-value").textContent = `${Math.round(view.z * 100)}%`;
}

function repaintAll() {
  const d = state.display;
  $("#top-control").hidden = d.view !== "top";
  $("#top-value").textContent = `${d.top}%`;
  $("#opacity-value").textContent = percent(d.opacity, 0);
  $("#colormap-select").disabled = d.view === "signed"; // the signed view has its own diverging map
  document.body.dataset.photo = String(d.photo);
  drawColorbar(d);
  if (state.run) for (const card of state.run.cards.values()) paint(card);
}

function paint(card) {
  paintCard(card, state.display);
}

// ---------------------------------------------------------------------------------------------- history

/** The comparison on screen goes into "Earlier results" as small pictures (what it showed, as it showed it);
 * its work still under way is cancelled. */
function archive(run) {
  const done = [...run.cards.values()].filter((c) => c.node.dataset.state === "done");
  if (done.length) {
    const figures = done.map((card) => {
      const [w, h] = fitWithin(card.width, card.height, 200);
      const thumb = el("canvas", { width: w, height: h });
      const ctx = thumb.getContext("2d");
      if (state.display.photo && run.image.display) ctx.drawImage($(".base", card.node), 0, 0, w, h);
      ctx.drawImage($(".heat", card.node), 0, 0, w, h);
      thumb.setAttribute("role", "img");
      const what = card.result.label ?? cardContext(card).split(" · ").pop();
      thumb.setAttribute("aria-label", `${card.method.title} on ${run.image.name}, ${what}`);
      return el("figure", {}, thumb, el("figcaption", { textContent: `${card.method.title}: ${what}` }));
    });
    const top = run.top && run.top.find((c) => c.index === explainedClass(run));
    state.history.unshift({ title: `${run.image.name} · ${run.model}${top ? ` · class ${top.index} ${top.label}` : ""}`,
                            figures });
    state.history.length = Math.min(state.history.length, HISTORY_KEEP);
  }
  for (const card of run.cards.values()) dropCard(card);
  zoom.remove($(".viewport", run.photo));
  $("#cards").replaceChildren();
  if (state.run === run) state.run = null;
  renderClasses();
  renderContext();
  renderHistory();
}

function renderHistory() {
  $("#history").hidden = !state.history.length;
  $("#history-list").replaceChildren(...state.history.map((entry) =>
    el("li", {}, el("h3", { textContent: entry.title }), el("div", { className: "thumbs" }, ...entry.figures))));
}

// ---------------------------------------------------------------------------------------------- downloads

function save(blob, name) {
  const link = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

/** The overlay at the photo's full size, in the view, colours and opacity on screen. */
async function downloadOverlay(card) {
  const button = $(".download-overlay", card.node);
  button.disabled = true;
  try {
    const blob = await overlayBlob(card, state.display);
    save(blob, `${card.run.image.stem}-${card.method.name}-${shownName(card)}-overlay.png`);
  } catch (err) {
    showProblem(card, `Could not make the overlay PNG: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

/** The files' names say what they show: the class, or the box. */
function shownName(card) {
  return card.detection === null ? String(card.result.target) : `box${card.detection + 1}`;
}

function downloadNpy(card) {
  const map = card.shown;
  const blob = new Blob([base64Bytes(map.npy)], { type: "application/octet-stream" });
  save(blob, `${card.run.image.stem}-${card.method.name}-${shownName(card)}-map-${map.height}x${map.width}.npy`);
}

// ---------------------------------------------------------------------------------------------- helpers

function formatBytes(n) {
  return n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB` : `${Math.max(1, Math.round(n / 1024))} kB`;
}

start();
