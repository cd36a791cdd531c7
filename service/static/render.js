// Drawing the maps in the display chosen (view, colours, opacity, photo): on the cards' canvases, in the shared
// colour bar, and at full size for the overlay download. `d` is the display: {cmap, view, top, opacity, photo}.
import { DIVERGING, compositeOver, lookupTable, paintHeat, paintSigned, paintTop, topLevel } from "./colormaps.js";
import { scaledGray, signedAt } from "./maps.js";

const $ = (selector, root = document) => root.querySelector(selector);

/** The shared colour bar and what it means in the current view. */
export function drawColorbar(d) {
  const table = lookupTable(d.view === "signed" ? DIVERGING : d.cmap);
  const canvas = $("#colorbar");
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(256, 1);
  for (let i = 0; i < 256; i++) {
    pixels.data.set([table[3 * i], table[3 * i + 1], table[3 * i + 2], 255], 4 * i);
  }
  ctx.putImageData(pixels, 0, 0);
  canvas.dataset.colormap = d.view === "signed" ? DIVERGING : d.cmap;
  const [low, mid, high, text] = {
    heat: ["least important", "", "most important",
           d.photo ? "Colour and opacity rise with the map's value: the unimportant parts leave the photo clear."
                   : "The map alone, coloured by its value."],
    top: ["", "", "",
          `Each map's top ${d.top}% of pixels stays clear; the rest is dimmed.`],
    signed: ["against the class", "0", "for the class",
             "Red raised the class's score, blue lowered it (the signed attribution, summed over the colour "
             + "channels); the photo is faded so that both show. Methods with no signed attribution show their map."],
  }[d.view];
  $("#legend-low").textContent = low;
  $("#legend-mid").textContent = mid;
  $("#legend-high").textContent = high;
  $("#legend-text").textContent = text;
  canvas.hidden = d.view === "top";
}

/** The overlay of width x height from `gray` (and `signed`) in the view `d`, into RGBA `out`. */
function paintPixels(out, gray, signed, width, height, photo, d) {
  if (d.view === "signed" && signed) {
    paintSigned(signed, lookupTable(DIVERGING), d.opacity, out, photo);
  } else if (d.view === "top") {
    paintTop(gray, topLevel(gray, d.top / 100), lookupTable(d.cmap), out, photo);
  } else {
    paintHeat(gray, lookupTable(d.cmap), d.opacity, out, photo);
  }
}

/** Draw the card's map on its heat canvas in the view `d`; say so when the signed view has no sign to show. */
export function paintCard(card, d) {
  const heat = $(".heat", card.node);
  const ctx = heat.getContext("2d");
  if (!card.gray) {
    ctx.clearRect(0, 0, heat.width, heat.height);
    return;
  }
  const pixels = ctx.createImageData(heat.width, heat.height);
  const photo = d.photo && Boolean(card.run.image.display);
  paintPixels(pixels.data, card.gray, card.signed, heat.width, heat.height, photo, d);
  ctx.putImageData(pixels, 0, 0);
  heat.dataset.colormap = d.view === "signed" && card.signed ? DIVERGING : d.cmap;
  heat.dataset.view = d.view === "signed" && !card.signed ? "heat" : d.view;
  const note = $(".card-note", card.node);
  const unsigned = d.view === "signed" && !card.signed;
  note.hidden = !unsigned;
  note.textContent = !unsigned ? ""
    : card.signedMap ? "This attribution has no negative part (it is not signed): shown as its map."
      : "No signed attribution for this map: shown as its map.";
}

/** The card's overlay at the photo's full size (the map's, when the browser cannot show the photo) as a PNG. */
export async function overlayBlob(card, d) {
  const image = card.run.image;
  let canvas;
  const photo = d.photo && Boolean(image.display);
  if (image.display) {
    const full = await createImageBitmap(image.file, { imageOrientation: "from-image" });
    canvas = new OffscreenCanvas(full.width, full.height);
    if (photo) canvas.getContext("2d").drawImage(full, 0, 0);
    full.close();
  } else {
    canvas = new OffscreenCanvas(card.shown.width, card.shown.height);
  }
  const { width, height } = canvas;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.getImageData(0, 0, width, height);
  const over = new Uint8ClampedArray(pixels.data.length);
  const signed = card.signed && card.signedMap ? signedAt(card.signedMap, width, height) : null;
  const gray = scaledGray(card.map, width, height);
  paintPixels(over, gray, signed, width, height, photo, d);
  compositeOver(pixels.data, over);
  ctx.putImageData(pixels, 0, 0);
  return canvas.convertToBlob({ type: "image/png" });
}
