"""The Python SDK for a Lepton server (sync ``Client`` and ``AsyncClient``; imports nothing from the server).

>>> from lepton.client import Client
>>> with Client("http://127.0.0.1:8000", api_key="lpt_...") as c:        # doctest: +SKIP
...     c.predict("cxr", "patient.dcm")["label"]
'pneumonia'
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

RETRY_STATUSES = (429, 503)


class LeptonClientError(Exception):
    """A request failed; ``status`` and ``code`` come from the server's error body when there is one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class AuthenticationError(LeptonClientError):
    """401/403: the API key is missing, invalid, revoked or lacks the scope."""


class NotFoundError(LeptonClientError):
    """404: no such model (or not visible to this key's tenant)."""


class InvalidInputError(LeptonClientError):
    """400/413/415/422: the request or image was rejected; the message says why."""


class RateLimitedError(LeptonClientError):
    """429 after all retries."""


class OverloadedError(LeptonClientError):
    """503 after all retries."""


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        err = response.json().get("error")
    except ValueError:
        err = None
    code, message = (err.get("code"), err.get("message")) if isinstance(err, dict) else (None, err or response.text)
    status = response.status_code
    cls = {401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError, 429: RateLimitedError,
           503: OverloadedError}.get(status, InvalidInputError if 400 <= status < 500 else LeptonClientError)
    raise cls(f"HTTP {status}: {message}", status, code)


def _payload(image: Any) -> dict[str, Any]:
    """Request arguments for a path, bytes, a NumPy array in [0, 1] or a PIL image."""
    if isinstance(image, str | Path):
        path = Path(image)
        return {"files": {"file": (path.name, path.read_bytes())}}
    if isinstance(image, bytes | bytearray):
        return {"files": {"file": ("image", bytes(image))}}
    try:
        from PIL import Image
    except ModuleNotFoundError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return {"files": {"file": ("image.png", buf.getvalue())}}
    import numpy as np

    if isinstance(image, np.ndarray):
        return {"json": {"array": image.astype(float).tolist()}}
    raise TypeError(f"cannot send {type(image).__name__}: pass a path, bytes, a NumPy array or a PIL image")


def _backoff(attempt: int, response: httpx.Response | None) -> float:
    if response is not None and response.headers.get("retry-after", "").isdigit():
        return min(float(response.headers["retry-after"]), 30.0)
    return min(0.1 * 2**attempt, 5.0)


class Client:
    """Synchronous client: ``predict``, ``predict_many``, ``models``, ``model``."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0, retries: int = 3):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = None
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException as exc:
                if attempt == self.retries:
                    raise LeptonClientError(f"timed out: {exc}") from exc
                time.sleep(_backoff(attempt, None))
                continue
            except httpx.TransportError as exc:
                raise LeptonClientError(f"cannot reach the server: {exc}") from exc
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                time.sleep(_backoff(attempt, response))
                continue
            _raise_for(response)
            return response.json()
        _raise_for(response)  # pragma: no cover

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models")["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{name}")

    def predict(self, model: str, image: Any, *, client_id: str | None = None) -> dict[str, Any]:
        """Label, probabilities, threshold, version and latency for one image."""
        headers = {"X-Lepton-Client": client_id} if client_id else None
        return self._request("POST", f"/v1/models/{model}/predict", headers=headers, **_payload(image))

    def predict_many(self, model: str, images: Iterable[Any], *, concurrency: int = 8) -> list[dict[str, Any]]:
        """Predict many images with at most ``concurrency`` requests in flight; results in input order."""
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(lambda img: self.predict(model, img), images))


class AsyncClient:
    """Asynchronous client with the same methods as ``Client``."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0, retries: int = 3):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = None
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TimeoutException as exc:
                if attempt == self.retries:
                    raise LeptonClientError(f"timed out: {exc}") from exc
                await asyncio.sleep(_backoff(attempt, None))
                continue
            except httpx.TransportError as exc:
                raise LeptonClientError(f"cannot reach the server: {exc}") from exc
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                await asyncio.sleep(_backoff(attempt, response))
                continue
            _raise_for(response)
            return response.json()
        _raise_for(response)  # pragma: no cover

    async def models(self) -> list[dict[str, Any]]:
        return (await self._request("GET", "/v1/models"))["models"]

    async def model(self, name: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/models/{name}")

    async def predict(self, model: str, image: Any, *, client_id: str | None = None) -> dict[str, Any]:
        headers = {"X-Lepton-Client": client_id} if client_id else None
        return await self._request("POST", f"/v1/models/{model}/predict", headers=headers, **_payload(image))

    async def predict_many(self, model: str, images: Iterable[Any], *, concurrency: int = 8) -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(img: Any) -> dict[str, Any]:
            async with gate:
                return await self.predict(model, img)

        return list(await asyncio.gather(*(one(img) for img in images)))
