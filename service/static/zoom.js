// Zoom and pan shared by every map of a comparison: each viewport shows the same part of the image.
//
// The view is a zoom z >= 1 and the image point (cx, cy), in fractions of the image, at the viewport's
// centre, so viewports of different pixel sizes stay in step. Each viewport's `.stack` is moved with one CSS
// transform (its canvases are not redrawn): translate in percent of its own size, then scale.

const MAX_ZOOM = 16;
const STEP = 1.5;

export class SyncZoom {
  constructor(onChange = () => {}) {
    this.z = 1;
    this.cx = 0.5;
    this.cy = 0.5;
    this.viewports = new Set();
    this.onChange = onChange;
  }

  /** Follow the view in `viewport` (an element holding a `.stack`) and let it drive the view. */
  add(viewport) {
    this.viewports.add(viewport);
    wire(this, viewport);
    this.apply(viewport);
  }

  remove(viewport) {
    this.viewports.delete(viewport);
  }

  set(z, cx, cy) {
    this.z = Math.min(MAX_ZOOM, Math.max(1, z));
    const half = 0.5 / this.z;
    this.cx = Math.min(1 - half, Math.max(half, cx));
    this.cy = Math.min(1 - half, Math.max(half, cy));
    for (const viewport of this.viewports) this.apply(viewport);
    this.onChange(this);
  }

  /** Zoom by `factor` keeping the image point under (u, v) (fractions of the viewport) where it is. */
  zoomAt(factor, u = 0.5, v = 0.5) {
    const px = this.cx + (u - 0.5) / this.z;
    const py = this.cy + (v - 0.5) / this.z;
    const z = Math.min(MAX_ZOOM, Math.max(1, this.z * factor));
    this.set(z, px - (u - 0.5) / z, py - (v - 0.5) / z);
  }

  zoomIn() { this.zoomAt(STEP); }
  zoomOut() { this.zoomAt(1 / STEP); }
  reset() { this.set(1, 0.5, 0.5); }

  /** Move the view by (du, dv) fractions of the viewport. */
  pan(du, dv) {
    this.set(this.z, this.cx - du / this.z, this.cy - dv / this.z);
  }

  apply(viewport) {
    const stack = viewport.querySelector(".stack");
    if (!stack) return;
    const tx = (0.5 - this.cx * this.z) * 100;
    const ty = (0.5 - this.cy * this.z) * 100;
    stack.style.transform = this.z === 1 ? "" : `translate(${tx}%, ${ty}%) scale(${this.z})`;
    viewport.dataset.zoomed = String(this.z > 1);
  }
}

function fractions(viewport, clientX, clientY) {
  const box = viewport.getBoundingClientRect();
  return [(clientX - box.left) / box.width, (clientY - box.top) / box.height, box];
}

function wire(zoom, viewport) {
  const pointers = new Map(); // pointerId -> [x, y]
  let pinch = null;

  // Ctrl + wheel (and a touchpad's pinch, which arrives as one) zooms; a plain wheel still scrolls the page.
  viewport.addEventListener("wheel", (event) => {
    if (!event.ctrlKey) return;
    event.preventDefault();
    const [u, v] = fractions(viewport, event.clientX, event.clientY);
    zoom.zoomAt(Math.exp(-event.deltaY / 300), u, v);
  }, { passive: false });

  viewport.addEventListener("dblclick", (event) => {
    const [u, v] = fractions(viewport, event.clientX, event.clientY);
    zoom.zoomAt(event.shiftKey ? 1 / 2 : 2, u, v);
  });

  viewport.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    pointers.set(event.pointerId, [event.clientX, event.clientY]);
    if (pointers.size === 2) {
      const [[x0, y0], [x1, y1]] = [...pointers.values()];
      pinch = { distance: Math.hypot(x1 - x0, y1 - y0), z: zoom.z };
    }
    if (zoom.z > 1 || pointers.size === 2) viewport.setPointerCapture(event.pointerId);
  });
  viewport.addEventListener("pointermove", (event) => {
    const last = pointers.get(event.pointerId);
    if (!last) return;
    const [x, y] = [event.clientX, event.clientY];
    pointers.set(event.pointerId, [x, y]);
    const box = viewport.getBoundingClientRect();
    if (pinch && pointers.size === 2) {
      const [[x0, y0], [x1, y1]] = [...pointers.values()];
      const [u, v] = fractions(viewport, (x0 + x1) / 2, (y0 + y1) / 2);
      zoom.zoomAt(pinch.z * Math.hypot(x1 - x0, y1 - y0) / pinch.distance / zoom.z, u, v);
    } else if (zoom.z > 1) {
      zoom.pan((x - last[0]) / box.width, (y - last[1]) / box.height);
    }
  });
  const release = (event) => {
    pointers.delete(event.pointerId);
    if (pointers.size < 2) pinch = null;
  };
  viewport.addEventListener("pointerup", release);
  viewport.addEventListener("pointercancel", release);

  viewport.addEventListener("keydown", (event) => {
    const moves = { ArrowLeft: [0.1, 0], ArrowRight: [-0.1, 0], ArrowUp: [0, 0.1], ArrowDown: [0, -0.1] };
    if (event.key === "+" || event.key === "=") zoom.zoomIn();
    else if (event.key === "-" || event.key === "_") zoom.zoomOut();
    else if (event.key === "0") zoom.reset();
    else if (moves[event.key] && zoom.z > 1) zoom.pan(...moves[event.key]);
    else return;
    event.preventDefault();
  });
}
