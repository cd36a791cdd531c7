// The sanity report beside the methods: each method's verdict for the chosen model, and "Run sanity check"
// (POST /v1/models/{name}/sanity, followed as a job).
//
// GET /v1/models gives each model `sanity`: null before any report, else {status, job_id, methods: {name:
// {verdict, reason}}}. A server without the sanity report sends no `sanity` at all: then nothing is shown.

import { ApiError } from "./api.js";
import { capitalize } from "./words.js";

const POLL_MS = 1000;
const $ = (selector, root = document) => root.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The verdict on `methodName` in `model`'s newest finished sanity report, or null. */
export function sanityVerdict(model, methodName) {
  const methods = model && model.sanity && model.sanity.methods;
  return (methods && methods[methodName]) || null;
}

export function sanityBadge(badge, verdict) {
  badge.hidden = !verdict;
  if (!verdict) return;
  const pass = verdict.verdict === "pass";
  badge.textContent = pass ? "sanity: pass" : "sanity: fail";
  badge.dataset.verdict = pass ? "pass" : "fail";
  badge.title = verdict.reason || "";
}

export class SanityPanel {
  /** `page`: {api, currentModel(), models() -> list, setModels(list)}. */
  constructor(page) {
    this.page = page;
    this.runs = new Map(); // model name -> {active, job, jobId, error}: a sanity check this page follows
    $("#sanity-run").addEventListener("click", () => {
      const model = page.currentModel();
      if (model) this.start(model.name);
    });
  }

  render() {
    const model = this.page.currentModel();
    const supported = Boolean(model && model.available && "sanity" in model);
    for (const option of document.querySelectorAll("#method-list .method-option")) {
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
    const run = this.runs.get(model.name);
    // A check started elsewhere (another tab, a script) and still going: follow it too.
    if (sanity && ["queued", "running"].includes(sanity.status) && sanity.job_id
        && !(run && (run.active || run.jobId === sanity.job_id))) {
      this.follow(model.name, { id: sanity.job_id, status: sanity.status, progress: null });
      return;
    }
    const active = Boolean(run && run.active);
    const progress = $("#sanity-progress");
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
    $("#sanity-run").hidden = active || Boolean(sanity && sanity.status === "done");
    const error = $("#sanity-error");
    error.textContent = (!active && run && run.error) || "";
    error.hidden = !error.textContent;
  }

  /** POST /v1/models/{name}/sanity, then follow its job. */
  async start(name) {
    await this.track(name, null, async (run) => {
      const { data } = await this.page.api.postJson(`/v1/models/${encodeURIComponent(name)}/sanity`, {});
      await this.poll(name, run, data);
    });
  }

  async follow(name, job) {
    await this.track(name, job, async (run) => {
      await this.poll(name, run, (await this.page.api.get(`/v1/jobs/${encodeURIComponent(job.id)}`)).data);
    });
  }

  async track(name, job, work) {
    const run = { active: true, job, jobId: job ? job.id : null, error: null };
    this.runs.set(name, run);
    this.render();
    try {
      await work(run);
    } catch (err) {
      run.error = err instanceof ApiError ? err.message : `Something went wrong in the page: ${err.message}`;
    }
    run.active = false;
    this.render();
  }

  async poll(name, run, job) {
    run.jobId = job.id;
    for (;;) {
      run.job = job;
      this.render();
      if (job.status === "succeeded" || job.status === "done") {
        await this.refresh(name, job.result);
        return;
      }
      if (job.status === "failed") {
        const message = job.error && job.error.message ? job.error.message : "no details";
        throw new ApiError(`The sanity check failed. ${capitalize(message)}${/[.!?]$/.test(message) ? "" : "."}`, 200);
      }
      if (job.status === "cancelled") {
        run.error = "The sanity check was cancelled.";
        await this.refresh(name, null);
        return;
      }
      await sleep(POLL_MS);
      job = (await this.page.api.get(`/v1/jobs/${encodeURIComponent(job.id)}`)).data;
    }
  }

  /** Reload GET /v1/models (keeping the form as it is); the finished report stands in if the list lags. */
  async refresh(name, report) {
    try {
      this.page.setModels((await this.page.api.get("/v1/models")).data);
    } catch (err) { /* keep the list we have */ }
    const model = this.page.models().find((m) => m.name === name);
    if (model && report && report.methods && !(model.sanity && model.sanity.status === "done")) {
      const methods = Object.fromEntries(Object.entries(report.methods)
        .map(([method, r]) => [method, { verdict: r.verdict, reason: r.reason }]));
      model.sanity = { status: "done", job_id: null, methods };
    }
  }
}
