// The form's methods and their parameters, built from GET /v1/methods, and read back.
import { ApiError } from "./api.js";
import { capitalize } from "./words.js";

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};

/** Grad-CAM's layer list for `model` (GET /v1/models `layers`), keeping `wanted` or the current choice. */
export function fillLayers(select, model, wanted) {
  const keep = wanted ?? select.value;
  const layers = (model && model.layers) || [];
  select.replaceChildren(el("option", { value: "", textContent: `default (${(model && model.default_layer) || "the card's"})` }));
  for (const layer of layers) select.append(el("option", { value: layer, textContent: layer }));
  select.value = layers.includes(keep) ? keep : "";
}

/** Parameters that several methods take with the same meaning (precision, aggregation, ...): their long
 * description is shown once, under "Parameters shared by several methods", rather than in every method. */
function sharedParams(methods) {
  const seen = new Map(); // name -> {description, count}
  for (const method of methods) {
    for (const [name, raw] of Object.entries((method.parameters && method.parameters.properties) || {})) {
      const description = unwrap(raw).description || "";
      const entry = seen.get(name);
      if (!entry) seen.set(name, { description, count: 1, same: true });
      else {
        entry.count++;
        entry.same &&= entry.description === description;
      }
    }
  }
  return new Map([...seen].filter(([, e]) => e.count > 1 && e.same && e.description).map(([n, e]) => [n, e.description]));
}

/** One option per method (GET /v1/methods: every fact about a method comes from its class), each with its
 * cost line, its sanity badge, why it does not apply to the model, and its parameters. `link`: the methods
 * ticked and the parameters set by a shared link (else the first method is ticked, at its defaults). */
export function buildMethods(methods, link, model) {
  const list = $("#method-list");
  list.replaceChildren();
  const shared = sharedParams(methods);
  for (const [index, method] of methods.entries()) {
    const id = `method-${method.name}`;
    const check = el("input", { type: "checkbox", id, value: method.name, name: "method",
                                checked: link.methods ? link.methods.includes(method.name) : index === 0 });
    check.setAttribute("aria-describedby", `${id}-cost ${id}-sanity ${id}-sanity-reason ${id}-na`);
    const option = el("div", { className: "method-option" }, check,
                      el("div", { className: "method-name" }, el("label", { htmlFor: id, textContent: method.title }),
                         el("span", { className: "badge", id: `${id}-sanity`, hidden: true })),
                      el("p", { className: "hint cost", id: `${id}-cost` }),
                      el("p", { className: "hint sanity-reason", id: `${id}-sanity-reason`, hidden: true }),
                      el("p", { className: "hint not-applicable", id: `${id}-na`, hidden: true }));
    option.dataset.method = method.name;
    const params = buildParams(method, shared, (link.params || {})[method.name] || {}, model);
    if (params) option.append(params);
    list.append(option);
  }
  const notes = $("#shared-list");
  notes.replaceChildren();
  for (const [name, description] of shared) notes.append(el("dt", { textContent: name }), el("dd", { textContent: description }));
  $("#shared-notes").hidden = !shared.size;
}

/** Nullable schemas (anyOf [X, null]) unwrap to X; the parameter may then be left empty. */
export function unwrap(spec) {
  if (!spec.anyOf) return { ...spec, nullable: false };
  const inner = spec.anyOf.find((s) => s.type !== "null") || {};
  return { ...inner, ...spec, anyOf: undefined, type: inner.type, nullable: true };
}

export function describeBounds(spec) {
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

/** The method's parameters, folded under a summary that names the ones changed from their defaults. */
function buildParams(method, shared, values, model) {
  const properties = (method.parameters && method.parameters.properties) || {};
  const names = Object.keys(properties);
  if (!names.length) return null;
  const fields = el("details", { className: "params", id: `params-${method.name}` },
                    el("summary", { id: `params-${method.name}-summary`, textContent: "Parameters" }));
  fields.dataset.method = method.name;
  for (const name of names) {
    const spec = unwrap(properties[name]);
    const id = `param-${method.name}-${name}`;
    const value = values[name];
    let control;
    if (name === "layer") {
      control = el("select", { id });
      fillLayers(control, model, value);
    } else if (spec.enum) {
      control = el("select", { id });
      if (spec.nullable) control.append(el("option", { value: "", textContent: "default" }));
      for (const option of spec.enum) {
        control.append(el("option", { value: option, textContent: option, selected: option === (value ?? spec.default) }));
      }
    } else if (spec.type === "integer" || spec.type === "number") {
      control = el("input", { id, type: "number", inputMode: spec.type === "integer" ? "numeric" : "decimal" });
      control.step = spec.type === "integer" ? "1" : "any";
      if (spec.minimum !== undefined) control.min = spec.minimum;
      if (spec.maximum !== undefined) control.max = spec.maximum;
      if (value !== undefined) control.value = value;
      else if (spec.default !== undefined && spec.default !== null) control.value = spec.default;
      else control.placeholder = "default";
    } else {
      control = el("input", { id, type: "text", placeholder: spec.default ?? "default", value: value ?? "" });
      if (spec.maxLength) control.maxLength = spec.maxLength;
    }
    control.dataset.param = name;
    control.dataset.spec = JSON.stringify(spec);
    const hintId = `${id}-hint`;
    control.setAttribute("aria-describedby", hintId);
    const bounds = capitalize(describeBounds(spec));
    const about = shared.has(name) ? `${bounds ? `${bounds}; ` : ""}shared: see the note under the methods.`
      : [spec.description, bounds].filter(Boolean).join(". ");
    fields.append(el("div", { className: "param" }, el("label", { htmlFor: id, textContent: name }), control,
                     el("p", { className: "hint", id: hintId, textContent: about })));
  }
  return fields;
}

function paramControls(method) {
  const fields = document.getElementById(`params-${method.name}`);
  return fields ? [...fields.querySelectorAll("[data-param]")] : [];
}

/** The method's parameters as typed; empty fields are left to the server's defaults. `strict`: throw on a
 * value out of bounds (before sending); otherwise skip it (for the cost line, while typing). */
export function readParams(method, strict = true) {
  const params = {};
  for (const control of paramControls(method)) {
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
        if (!strict) continue;
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

/** The parameters that differ from their defaults (for the summary line and the link). */
export function changedParams(method) {
  const changed = {};
  for (const control of paramControls(method)) {
    const spec = JSON.parse(control.dataset.spec);
    const value = control.value.trim();
    if (value !== "" && value !== String(spec.default ?? "")) changed[control.dataset.param] = value;
  }
  return changed;
}

export function checkedMethods(methods) {
  return [...document.querySelectorAll("#method-list input[name='method']:checked")]
    .map((c) => methods.find((m) => m.name === c.value));
}
