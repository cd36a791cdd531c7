// Calls to the service's /v1 API, with its errors turned into plain words.

export class ApiError extends Error {
  constructor(message, status, code, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, from a 429's or 503's Retry-After
  }
}

function sentence(text) {
  const t = String(text || "").trim();
  return /[.!?]$/.test(t) ? t : `${t}.`;
}

/** What went wrong, for a person: the status in words plus the server's own message. */
export function plainWords(status, body, retryAfter) {
  const message = body && body.error && body.error.message ? body.error.message : "";
  const detail = message ? ` ${sentence(message[0].toUpperCase() + message.slice(1))}` : "";
  switch (status) {
    case 400: case 422:
      return `The server could not use this request.${detail}`;
    case 401:
      return "This server needs an API key: enter it under “API key” and try again.";
    case 404:
      return `The server does not know this.${detail}`;
    case 413:
      return `Too large for the server.${detail}`;
    case 415:
      return `The server cannot read this kind of upload.${detail}`;
    case 429:
      return body && body.error && body.error.code === "overloaded"
        ? `The server is busy: the work queued ahead would not let this start in time. Try again in ${retryAfter || "a few"} seconds.`
        : `The server is busy (its queue is full). Try again in ${retryAfter || "a few"} seconds.`;
    case 503:
      return "The server is not ready yet (its models are still loading). Try again in a moment.";
    case 504:
      return `The server was too busy to start this in time. Try again later.${detail}`;
    default:
      return status >= 500 ? `The server failed (HTTP ${status}).${detail}`
                           : `Unexpected answer from the server (HTTP ${status}).${detail}`;
  }
}

export class Api {
  constructor(getKey) {
    this.getKey = getKey;
  }

  async request(method, path, body, extraHeaders = {}) {
    const headers = { Accept: "application/json", ...extraHeaders };
    const key = this.getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(path, { method, body, headers });
    } catch (err) {
      throw new ApiError("Could not reach the server. Is it still running?", 0, "network");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const header = Number(response.headers.get("Retry-After"));
      const retryAfter = header > 0 ? Math.ceil(header) : null;
      throw new ApiError(plainWords(response.status, data, retryAfter), response.status,
                         data && data.error ? data.error.code : undefined, retryAfter);
    }
    if (data === null) throw new ApiError("The server sent an answer this page cannot read.", response.status);
    return { status: response.status, data };
  }

  get(path) { return this.request("GET", path); }
  post(path, form) { return this.request("POST", path, form); }
  postJson(path, value) {
    return this.request("POST", path, JSON.stringify(value), { "Content-Type": "application/json" });
  }
  delete(path) { return this.request("DELETE", path); }
}
