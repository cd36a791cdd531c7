// Colour maps applied in the page, so switching map or opacity never needs a new request.
// jet, viridis and inferno use the same anchor colours as the server's overlays (service/imaging.py).

const ANCHORS = {
  jet: [[0, "#000080"], [0.125, "#0000ff"], [0.375, "#00ffff"], [0.625, "#ffff00"], [0.875, "#ff0000"],
        [1, "#800000"]],
  viridis: ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21908c", "#27ad81", "#5dc863", "#aadc32", "#fde725"]
    .map((c, i) => [i / 8, c]),
  inferno: ["#000004", "#1b0c42", "#4b0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9a06", "#f7d03c",
            "#fcffa4"].map((c, i) => [i / 9, c]),
  gray: [[0, "#000000"], [1, "#ffffff"]],
};

export const COLORMAP_NAMES = Object.keys(ANCHORS);

function rgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

const tables = new Map();

/** 256 RGB entries (a Uint8Array of 768), linearly interpolated between the anchors. */
export function lookupTable(name) {
  if (tables.has(name)) return tables.get(name);
  const anchors = ANCHORS[name];
  if (!anchors) throw new Error(`unknown colour map ${name}`);
  const table = new Uint8Array(768);
  for (let level = 0; level < 256; level++) {
    const x = level / 255;
    let k = 0;
    while (k < anchors.length - 2 && x > anchors[k + 1][0]) k++;
    const [x0, c0] = anchors[k];
    const [x1, c1] = anchors[k + 1];
    const t = x1 > x0 ? Math.min(1, Math.max(0, (x - x0) / (x1 - x0))) : 0;
    const a = rgb(c0);
    const b = rgb(c1);
    for (let ch = 0; ch < 3; ch++) table[level * 3 + ch] = Math.round(a[ch] + t * (b[ch] - a[ch]));
  }
  tables.set(name, table);
  return table;
}

/** Colour a grayscale map (one byte per pixel) into opaque RGBA pixels `out` (an ImageData's data). */
export function colorize(gray, table, out) {
  for (let i = 0, j = 0; i < gray.length; i++, j += 4) {
    const k = gray[i] * 3;
    out[j] = table[k];
    out[j + 1] = table[k + 1];
    out[j + 2] = table[k + 2];
    out[j + 3] = 255;
  }
}

/** Blend the coloured map over an image in place: (1 - alpha) * image + alpha * colour, as the server does. */
export function blend(image, gray, table, alpha) {
  const keep = 1 - alpha;
  for (let i = 0, j = 0; i < gray.length; i++, j += 4) {
    const k = gray[i] * 3;
    image[j] = keep * image[j] + alpha * table[k];
    image[j + 1] = keep * image[j + 1] + alpha * table[k + 1];
    image[j + 2] = keep * image[j + 2] + alpha * table[k + 2];
    image[j + 3] = 255;
  }
}
