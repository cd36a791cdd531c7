// A card's figures in words: its diagnostics read against their known good ranges, its faithfulness metrics
// with a verdict and the deletion curve.
import { curvePlot } from "./plots.js";
import { capitalize, faithfulness, readDiagnostics, stability } from "./words.js";

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};

/** Diagnostics under their names in words, with their meanings; the ones with a known good range also get a
 * verdict, shown on the card itself. */
export function renderDiagnostics(node, diagnostics, meanings) {
  const readings = readDiagnostics(diagnostics, meanings);
  const list = $(".diagnostics", node);
  list.replaceChildren();
  if (!readings.length) list.append(el("dt", { textContent: "None" }), el("dd", { textContent: "this method reports none" }));
  for (const r of readings) {
    const value = el("dd", {}, el("span", { className: "value", textContent: r.value }));
    if (r.verdict) value.append(" ", verdictBadge(r.verdict[0]), ` ${r.verdict[1]}`);
    if (r.meaning) value.append(el("span", { className: "hint meaning", textContent: capitalize(r.meaning) }));
    list.append(el("dt", { textContent: r.label, title: r.name }), value);
  }
  const verdicts = $(".card-verdicts", node);
  verdicts.replaceChildren(...readings.filter((r) => r.verdict).map((r) =>
    el("p", { className: "metric" }, verdictBadge(r.verdict[0]), ` ${r.label} ${r.value}: ${r.verdict[1]}.`)));
}

export function verdictBadge(kind) {
  const badge = el("span", { className: "badge", textContent: kind });
  badge.dataset.verdict = kind === "good" ? "pass" : kind === "poor" ? "fail" : "fair";
  return badge;
}

/** The per-map metrics in plain words, and the deletion curve against a random order as a small plot. */
export function renderMetrics(node, method, metrics) {
  const box = $(".faithfulness", node);
  box.hidden = !metrics;
  if (!metrics) return;
  const figure = (v) => (typeof v === "number" ? v.toFixed(2) : "?");
  const verdict = faithfulness(metrics);
  const line = $(".verdict", box);
  line.replaceChildren(...(verdict ? [verdictBadge(verdict[0]), ` ${verdict[1]}`] : []));
  $(".deletion", box).textContent = `Deleting the top pixels first: class probability area ${figure(metrics.deletion_auc)} `
    + `vs ${figure(metrics.deletion_auc_random)} for a random order (lower = more faithful)`;
  $(".insertion", box).textContent = `Inserting the top pixels first: class probability area ${figure(metrics.insertion_auc)} `
    + `vs ${figure(metrics.insertion_auc_random)} for a random order (higher = more faithful)`;
  const steady = $(".stability", box);
  steady.hidden = typeof metrics.stability !== "number";
  steady.textContent = steady.hidden ? ""
    : `Stability ${figure(metrics.stability)} (rank correlation of two halves of the samples): ${stability(metrics.stability)[1]}`;
  $(".metric-settings", box).textContent = `${metrics.steps} steps; deleted pixels replaced by ${metrics.replacement}.`;
  const curve = $(".curve", box);
  curve.replaceChildren();
  if (Array.isArray(metrics.deletion_curve) && metrics.deletion_curve.length > 1) {
    curve.append(curvePlot(`curve-${method.name}`, metrics.deletion_curve, metrics.deletion_curve_random || [],
      `Deletion curve of ${method.title}: the class probability as the top pixels are deleted first `
      + `(area ${figure(metrics.deletion_auc)}) and in a random order (area ${figure(metrics.deletion_auc_random)})`));
  }
}

export function fillList(dl, pairs) {
  dl.replaceChildren();
  for (const [key, value] of pairs) dl.append(el("dt", { textContent: key }), el("dd", { textContent: value }));
}
