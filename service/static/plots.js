// Small SVG drawings: the deletion curve of a map, and a detector's boxes over the image.

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

/** Two curves of K+1 probabilities over x = k/K, on axes 0-1, with a legend on the right. */
export function curvePlot(id, curve, random, title) {
  const [width, height, left, top, plotW, plotH] = [280, 150, 30, 8, 160, 110];
  const x = (t) => (left + t * plotW).toFixed(1);
  const y = (p) => (top + (1 - Math.min(1, Math.max(0, p))) * plotH).toFixed(1);
  const points = (values) => values.map((p, k) => `${x(k / (values.length - 1))},${y(p)}`).join(" ");
  const bottom = top + plotH;
  const text = (content, attributes) => svg("text", attributes, content);
  const legend = (row, cls, label) => [
    svg("line", { class: cls, x1: left + plotW + 12, x2: left + plotW + 32, y1: top + 10 + row * 18, y2: top + 10 + row * 18 }),
    text(label, { x: left + plotW + 36, y: top + 14 + row * 18 })];
  return svg("svg", { class: "curve-plot", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": `${id}-title` },
    svg("title", { id: `${id}-title` }, title),
    svg("path", { class: "axis", d: `M${left},${top} V${bottom} H${left + plotW}` }),
    text("1", { x: left - 5, y: top + 4, "text-anchor": "end" }),
    text("0", { x: left - 5, y: bottom + 4, "text-anchor": "end" }),
    text("0", { x: left, y: bottom + 14, "text-anchor": "middle" }),
    text("1", { x: left + plotW, y: bottom + 14, "text-anchor": "middle" }),
    text("fraction of pixels deleted", { x: left + plotW / 2, y: bottom + 26, "text-anchor": "middle" }),
    text("probability", { x: 10, y: top + plotH / 2, "text-anchor": "middle", transform: `rotate(-90 10 ${top + plotH / 2})` }),
    svg("polyline", { class: "curve-random", points: points(random) }),
    svg("polyline", { class: "curve-map", points: points(curve) }),
    ...legend(0, "curve-map", "top first"),
    ...legend(1, "curve-random", "random"));
}

/** Draw `detections` ([{box: [x1, y1, x2, y2] in image pixels, label, score}]) into `layer` (an <svg> over an
 * image of width x height); `selected`: the index drawn as chosen. Each box answers a click with `pick(i)`. */
export function drawBoxes(layer, detections, width, height, selected, pick) {
  layer.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const stroke = Math.max(1, Math.round(Math.max(width, height) / 300));
  layer.replaceChildren(...detections.map((d, i) => {
    const [x1, y1, x2, y2] = d.box;
    const group = svg("g", { class: "box", "data-index": i, "data-selected": String(i === selected) },
      svg("rect", { x: x1, y: y1, width: Math.max(0, x2 - x1), height: Math.max(0, y2 - y1), "stroke-width": stroke }),
      svg("text", { x: x1 + stroke, y: Math.max(y1 - 2 * stroke, 12 * stroke), "font-size": 12 * stroke },
          `${d.label} ${Math.round(100 * d.score)}%`));
    group.addEventListener("click", (event) => {
      event.stopPropagation();
      pick(i);
    });
    return group;
  }));
}
