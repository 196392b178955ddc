// REST calls: JSON in, JSON out, errors as ApiError with the protocol's error code.

/** A failed REST call. `status` 0 means the server could not be reached at all. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Calls the API with the bearer token (the server sets no cookies; the token lives in
 * localStorage so a reload stays signed in). */
export async function call(method, path, { token, body } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "network", "cannot reach the server");
  }
  if (res.status === 204) return null;
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    throw new ApiError(res.status, data?.error?.code ?? "internal", data?.error?.message ?? `HTTP ${res.status}`);
  }
  return data;
}

/** Room ids go into paths; DM ids contain ':' which is fine, anything else is encoded. */
export function roomPath(id) {
  return `/api/rooms/${encodeURIComponent(id).replace(/%3A/gi, ":")}`;
}
