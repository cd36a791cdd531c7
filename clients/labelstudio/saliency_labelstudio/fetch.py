"""Task images: data URLs, Label Studio's own files (with its token, sent to that host only), plain URLs."""
from __future__ import annotations

import base64
import binascii
from urllib.parse import urljoin, urlsplit

import httpx


class FetchError(Exception):
    pass


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _looks_like_jwt(key: str) -> bool:
    return key.count(".") == 2 and key.startswith("eyJ")


class ImageFetcher:
    """`label_studio_url` and `api_key` say where Label Studio is and how to authenticate to it.

    The key is sent only to Label Studio's own origin (scheme, host and port): a task may point anywhere,
    and a token must not leak to a third-party host named in task data.
    """

    def __init__(self, label_studio_url: str | None, api_key: str | None, timeout: float = 30.0,
                 max_bytes: int = 50 * 2**20):
        self.base = label_studio_url.rstrip("/") + "/" if label_studio_url else None
        self.api_key, self.max_bytes = api_key, max_bytes
        # httpx drops Authorization on a redirect to another origin (a presigned cloud URL)
        self._http = httpx.Client(timeout=timeout, follow_redirects=True)
        self._access: str | None = None  # short-lived JWT access token, from a personal access token

    def close(self) -> None:
        self._http.close()

    def _auth_header(self, refresh: bool = False) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not _looks_like_jwt(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}  # legacy token
        if self._access is None or refresh:  # a personal access token is a refresh token: trade it in
            assert self.base is not None  # only Label Studio's own origin is sent the key
            r = self._http.post(urljoin(self.base, "api/token/refresh/"), json={"refresh": self.api_key})
            if r.status_code != 200:
                raise FetchError(f"Label Studio refused the personal access token: "
                                 f"{r.status_code} {r.text[:200]}")
            self._access = r.json()["access"]
        return {"Authorization": f"Bearer {self._access}"}

    def _get(self, url: str, authenticated: bool) -> bytes:
        headers = self._auth_header() if authenticated else {}
        r = self._http.get(url, headers=headers)
        if r.status_code == 401 and authenticated and self._access is not None:
            r = self._http.get(url, headers=self._auth_header(refresh=True))  # the access token expired
        if r.status_code != 200:
            raise FetchError(f"GET {url}: {r.status_code}")
        if len(r.content) > self.max_bytes:
            raise FetchError(f"GET {url}: {len(r.content)} bytes is over the limit")
        return r.content

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise FetchError("only base64 data URLs are supported")
            try:
                return base64.b64decode(payload, validate=True)
            except binascii.Error:
                raise FetchError("the data URL is not valid base64") from None
        scheme = urlsplit(url).scheme
        if scheme in ("s3", "gs", "azure-blob", "azure-spi") and task_id is not None:
            url = self._presign_url(url, task_id)  # Label Studio signs cloud URIs for its own tasks
            scheme = ""
        if scheme in ("", "http", "https"):
            if not scheme:  # /data/upload/..., /data/local-files/?d=..., /tasks/../presign/...
                if self.base is None:
                    raise FetchError(f"{url} is relative to Label Studio: set LABEL_STUDIO_URL")
                url = urljoin(self.base, url.lstrip("/"))
            own = self.base is not None and _origin(url) == _origin(self.base)
            return self._get(url, authenticated=own)
        raise FetchError(f"cannot fetch {url!r}: unsupported scheme")

    def _presign_url(self, uri: str, task_id: int) -> str:
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode().rstrip("=")
        return f"tasks/{task_id}/presign/?fileuri={fileuri}"
