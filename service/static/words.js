// Figures in plain words: costs and times, the methods' diagnostics, the per-map metrics.

export function formatCount(n) {
  return Math.round(n).toLocaleString("en-US");
}

export function formatDuration(seconds) {
  if (seconds < 1) return "under a second";
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function percent(p, digits = 1) {
  return `${(100 * p).toFixed(digits)}%`;
}

export function capitalize(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

/** A parameter's schema default, through a nullable anyOf. */
function schemaDefault(spec) {
  if (!spec) return undefined;
  if (spec.default !== undefined && spec.default !== null) return spec.default;
  const inner = (spec.anyOf || []).find((s) => s.default !== undefined);
  return inner ? inner.default : undefined;
}

/** Passes per image as the server counts them: the product of the method's cost factors (its parameters,
 * GET /v1/methods `cost_factors`), with the factors for the words. */
export function passesOf(method, params) {
  const properties = (method.parameters && method.parameters.properties) || {};
  const factors = (method.cost_factors || []).map((name) => {
    const value = Number(params[name] ?? schemaDefault(properties[name]) ?? 1);
    return [name, value];
  });
  return { passes: factors.reduce((total, [, value]) => total * value, 1), factors };
}

/** Seconds per pass for `method` on `model` from GET /v1/timings: its own recent figure, else (rough) the
 * median of the model's other methods; null when the server has answered nothing for that model yet. */
export function rateFor(timings, model, method) {
  const rates = (timings && timings.rates) || [];
  const own = rates.find((r) => r.model === model && r.method === method);
  if (own) return { secondsPerPass: own.seconds_per_pass, rough: false };
  const others = rates.filter((r) => r.model === model).map((r) => r.seconds_per_pass).sort((a, b) => a - b);
  if (!others.length) return null;
  return { secondsPerPass: others[Math.floor(others.length / 2)], rough: true };
}

/** What a run of `method` will cost, before it is sent: {passes, seconds (null: unknown), text}. */
export function estimate(method, params, { timings, model, metricsPasses = 0 }) {
  const { passes, factors } = passesOf(method, params);
  const total = passes + metricsPasses;
  const rate = rateFor(timings, model, method.name);
  let seconds = null;
  if (rate) {
    seconds = total * rate.secondsPerPass;
    const lane = timings.bulk_above_passes && total > timings.bulk_above_passes ? "bulk" : "interactive";
    const wait = timings.queue_s && timings.queue_s[lane];
    if (wait > 0) seconds += wait;
  }
  let text = `${formatCount(passes)} pass${passes === 1 ? "" : "es"}`;
  if (factors.length > 1) text += ` (${factors.map(([name, value]) => `${formatCount(value)} ${name}`).join(" × ")})`;
  if (metricsPasses) text += ` + ${metricsPasses} for the metrics`;
  text += seconds === null ? "; time not measured on this server yet"
                           : `; about ${formatDuration(seconds)}${rate.rough ? " (from its other methods)" : ""}`;
  return { passes: total, seconds, text };
}

// Readings of the diagnostics whose good and bad values are known; their meanings come from GET /v1/methods.
// Thresholds: Integrated Gradients' completeness within 5% of the score change (Sundararajan et al. 2017,
// section 3); FullGrad exact to 0.1% on a piecewise-linear net (the server's own `complete`).
const READINGS = {
  relative_delta: (v) => (v <= 0.05 ? ["good", `the map adds up to the score change within ${percent(v)}`]
    : v <= 0.2 ? ["fair", `the map misses ${percent(v)} of the score change; more n_steps would close it`]
      : ["poor", `the map misses ${percent(v)} of the score change: raise n_steps`]),
  completeness_gap: (v) => (v <= 0.001 ? ["good", "the map's terms add up to the class score"]
    : v <= 0.05 ? ["fair", `the map's terms miss ${percent(v)} of the class score`]
      : ["poor", `the map's terms miss ${percent(v)} of the class score (expected on a net with smooth `
                 + "activations such as SiLU)"]),
};

export function formatValue(v) {
  if (typeof v === "number") return Number.isInteger(v) ? formatCount(v) : v.toPrecision(3);
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v)) return v.map(formatValue).join(" × ");
  return typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
}

/** Each diagnostic as {name, label, value, meaning, verdict: [good|fair|poor, words] | null}. */
export function readDiagnostics(diagnostics, meanings = {}) {
  return Object.entries(diagnostics || {}).map(([name, value]) => {
    const reading = READINGS[name];
    return { name, label: capitalize(name.replaceAll("_", " ")), value: formatValue(value),
             meaning: meanings[name] || "", verdict: reading && typeof value === "number" ? reading(value) : null };
  });
}

/** One verdict on a map's deletion and insertion figures against a random order of its pixels. A margin of
 * 0.05 in area (a twentieth of the whole range) keeps noise from reading as a verdict. */
export function faithfulness(metrics) {
  const deletion = metrics.deletion_auc_random - metrics.deletion_auc;
  const insertion = metrics.insertion_auc - metrics.insertion_auc_random;
  if (!(Number.isFinite(deletion) && Number.isFinite(insertion))) return null;
  if (deletion >= 0.05 && insertion >= 0.05) {
    return ["good", "Removing the pixels this map ranks first lowers the class's probability faster than a random "
                    + "order, and restoring them raises it faster: the map points at what the model uses."];
  }
  if (deletion <= 0 && insertion <= 0) {
    return ["poor", "No better than a random order of the pixels: this map says little about what the model uses."];
  }
  return ["fair", "Better than a random order on one test only, or by a small margin: read this map with care."];
}

/** A rank correlation between two halves of the samples, read. */
export function stability(value) {
  if (value >= 0.8) return ["good", "two halves of its samples give nearly the same ranking"];
  if (value >= 0.5) return ["fair", "two halves of its samples agree only broadly: more samples would steady it"];
  return ["poor", "two halves of its samples disagree: raise the number of samples before trusting it"];
}
