// The numbers behind the pictures: .npy arrays from the server, the signed attribution as a map, resizing.

export function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** A little-endian float .npy (numpy's format 1-3) as {shape, data: Float32Array}; null for anything else. */
export function parseNpy(bytes) {
  const magic = String.fromCharCode(...bytes.subarray(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  const [length, start] = major === 1 ? [view.getUint16(8, true), 10] : [view.getUint32(8, true), 12];
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + length));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !shape || /'fortran_order':\s*True/.test(header)) return null;
  const dims = shape[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = dims.reduce((a, b) => a * b, 1);
  const offset = start + length;
  const body = bytes.slice(offset, offset + count * (descr[1] === "<f8" ? 8 : 4)); // a copy: aligned
  if (descr[1] === "<f4") return { shape: dims, data: new Float32Array(body.buffer, 0, count) };
  if (descr[1] === "<f8") return { shape: dims, data: Float32Array.from(new Float64Array(body.buffer, 0, count)) };
  return null;
}

/** The signed attribution (the server's `raw`: (C, H, W) or (H, W)) summed over its channels, with the scale
 * that maps it to [-1, 1] (the 99th percentile of |value|, as the server clips its maps, so that a few extreme
 * pixels do not wash out the rest) and whether it is signed at all: at least 0.1% of its pixels clearly negative and as many positive.
 * FullGrad's, for one, is a sum of absolute values: not signed. */
export function signedMap(npy) {
  if (!npy || npy.shape.length < 2) return null;
  const [height, width] = npy.shape.slice(-2);
  const channels = npy.data.length / (height * width);
  const plane = new Float32Array(height * width);
  for (let c = 0; c < channels; c++) {
    const offset = c * plane.length;
    for (let i = 0; i < plane.length; i++) plane[i] += npy.data[offset + i];
  }
  const magnitudes = Float32Array.from(plane, Math.abs).sort();
  let scale = magnitudes[Math.min(magnitudes.length - 1, Math.floor(0.99 * magnitudes.length))];
  if (!(scale > 0)) scale = magnitudes[magnitudes.length - 1];
  if (!(scale > 0) || !Number.isFinite(scale)) return null;
  let negative = 0;
  let positive = 0;
  for (const v of plane) {
    if (v < -0.01 * scale) negative++;
    else if (v > 0.01 * scale) positive++;
  }
  const least = 0.001 * plane.length;
  return { plane, width, height, scale, signed: negative >= least && positive >= least,
           negativeShare: negative / plane.length };
}

/** Bilinear resize of a float map (half-pixel centres, as PyTorch's align_corners=False). */
export function resizeBilinear(src, sw, sh, dw, dh) {
  const out = new Float32Array(dw * dh);
  const xs = new Float32Array(dw);
  const x0s = new Int32Array(dw);
  for (let x = 0; x < dw; x++) {
    const fx = Math.min(sw - 1, Math.max(0, (x + 0.5) * (sw / dw) - 0.5));
    x0s[x] = Math.floor(fx);
    xs[x] = fx - x0s[x];
  }
  for (let y = 0; y < dh; y++) {
    const fy = Math.min(sh - 1, Math.max(0, (y + 0.5) * (sh / dh) - 0.5));
    const y0 = Math.floor(fy);
    const y1 = Math.min(sh - 1, y0 + 1);
    const ty = fy - y0;
    for (let x = 0; x < dw; x++) {
      const x0 = x0s[x];
      const x1 = Math.min(sw - 1, x0 + 1);
      const tx = xs[x];
      const top = src[y0 * sw + x0] * (1 - tx) + src[y0 * sw + x1] * tx;
      const bottom = src[y1 * sw + x0] * (1 - tx) + src[y1 * sw + x1] * tx;
      out[y * dw + x] = top * (1 - ty) + bottom * ty;
    }
  }
  return out;
}

/** The signed map at width x height, in [-1, 1]. */
export function signedAt(map, width, height) {
  const out = resizeBilinear(map.plane, map.width, map.height, width, height);
  for (let i = 0; i < out.length; i++) out[i] = Math.max(-1, Math.min(1, out[i] / map.scale));
  return out;
}

/** The map (an 8-bit grayscale bitmap) scaled (bilinear) to width x height, one byte per pixel. */
export function scaledGray(bitmap, width, height) {
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, width, height);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const gray = new Uint8Array(width * height);
  for (let i = 0, j = 0; i < gray.length; i++, j += 4) gray[i] = rgba[j];
  return gray;
}

export function fitWithin(width, height, longest) {
  const scale = Math.min(1, longest / Math.max(width, height));
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}
