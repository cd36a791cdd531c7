// The page's settings in its address (the part after #), so that a link restores them: the model, the
// methods and their parameters, the map options, the display and the class. Never the image, never the key.

const DISPLAY_KEYS = ["cmap", "view", "top", "opacity", "photo"];

/** Settings -> "#model=...&methods=a,b&p.a.n_steps=8&..." (only what differs from the defaults). */
export function writeLink(settings) {
  const out = new URLSearchParams();
  if (settings.model) out.set("model", settings.model);
  if (settings.methods && settings.methods.length) out.set("methods", settings.methods.join(","));
  for (const [method, params] of Object.entries(settings.params || {})) {
    for (const [name, value] of Object.entries(params)) out.set(`p.${method}.${name}`, String(value));
  }
  if (settings.size === "original") out.set("size", "original");
  if (settings.metrics) out.set("metrics", "1");
  for (const key of DISPLAY_KEYS) {
    if (settings.display && settings.display[key] !== undefined) out.set(key, String(settings.display[key]));
  }
  if (settings.target !== null && settings.target !== undefined) out.set("class", String(settings.target));
  return `#${out.toString()}`;
}

/** "#..." -> the settings it names (fields absent when the link does not say). */
export function readLink(hash) {
  const input = new URLSearchParams((hash || "").replace(/^#/, ""));
  const settings = { params: {}, display: {} };
  if (input.has("model")) settings.model = input.get("model");
  if (input.has("methods")) settings.methods = input.get("methods").split(",").filter(Boolean);
  for (const [key, value] of input) {
    const match = /^p\.([^.]+)\.(.+)$/.exec(key);
    if (match) (settings.params[match[1]] ||= {})[match[2]] = value;
  }
  if (input.has("size")) settings.size = input.get("size");
  if (input.has("metrics")) settings.metrics = input.get("metrics") === "1";
  for (const key of DISPLAY_KEYS) if (input.has(key)) settings.display[key] = input.get(key);
  const target = Number.parseInt(input.get("class"), 10);
  if (Number.isInteger(target) && target >= 0) settings.target = target;
  return settings;
}
