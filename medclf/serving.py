"""`medclf serve`: a trained model behind an HTTP API (FastAPI + uvicorn) and a web page.

Uploads are decoded by the one input path `medclf predict` uses (inference.input_store → store.decode_image),
then queued for one worker that batches whatever is waiting into a single forward pass and runs it in a
thread, so the event loop keeps accepting requests while the cores compute. The queue is bounded (in images):
when it is full a request gets 503 at once instead of waiting without limit. Every refusal of the user's
input is a 4xx JSON body {"detail": "one line"}.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from .errors import MedclfError
from .gradcam import grad_cam, overlay
from .inference import LoadedModel, input_store, load_for_inference, model_view, normalise, view_uint8
from .manifest import build_manifest
from .model_card import card_headline

MAX_UPLOAD_MB = 20.0  # per request: a chest radiograph PNG is a few MB
MAX_PIXELS = 50_000_000  # per image: far above any radiograph or mammogram, far below a decompression bomb
MAX_FILES = 64  # images per request
QUEUE_IMAGES = 256  # images waiting or running before new requests get 503
MAX_BATCH = 32  # images per forward pass
ACCEPTED_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "application/dicom", "image/dicom",
                  "application/octet-stream", ""}


@dataclass
class Limits:
    max_upload_bytes: int = int(MAX_UPLOAD_MB * 1e6)
    max_pixels: int = MAX_PIXELS
    max_files: int = MAX_FILES
    queue_images: int = QUEUE_IMAGES
    max_batch: int = MAX_BATCH


@dataclass
class Job:
    kind: str  # "predict" (batched with its neighbours) or "explain"
    images: torch.Tensor  # uint8 N×C×H×W, as the store holds them
    future: asyncio.Future
    target: int | None = None


@dataclass
class Batcher:
    """A bounded queue of jobs and the one worker that runs them, predict jobs merged into shared batches."""

    loaded: LoadedModel
    limits: Limits
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: int = 0  # images queued or running
    batches: int = 0  # forward passes run for /predict, and the images they held
    batched_images: int = 0
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="medclf"))

    async def submit(self, kind: str, images: torch.Tensor, target: int | None = None) -> Any:
        n = len(images)
        if self.pending + n > self.limits.queue_images:
            raise HTTPException(503, f"server busy: {self.pending} image(s) already queued (limit "
                                     f"{self.limits.queue_images}); retry shortly", headers={"Retry-After": "1"})
        self.pending += n
        try:
            job = Job(kind, images, asyncio.get_running_loop().create_future(), target)
            self.queue.put_nowait(job)
            return await job.future
        finally:
            self.pending -= n

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        held: Job | None = None
        while True:
            job = held or await self.queue.get()
            held = None
            batch = [job]
            while job.kind == "predict" and not self.queue.empty() and \
                    sum(len(j.images) for j in batch) < self.limits.max_batch:
                nxt = self.queue.get_nowait()
                if nxt.kind != "predict":
                    held = nxt  # runs next, after this batch
                    break
                batch.append(nxt)
            batch = [j for j in batch if not j.future.done()]  # a client that gave up (cancelled) needs nothing
            if not batch:
                continue
            try:
                if job.kind == "predict":
                    images = torch.cat([j.images for j in batch])
                    probs = await loop.run_in_executor(self.executor, self.predict, images)
                    self.batches, self.batched_images = self.batches + 1, self.batched_images + len(images)
                    start = 0
                    for j in batch:
                        _resolve(j.future, probs[start:start + len(j.images)])
                        start += len(j.images)
                else:
                    _resolve(job.future, await loop.run_in_executor(self.executor, self.explain, job.images,
                                                                    job.target))
            except Exception as exc:  # noqa: BLE001  handed to the waiting requests, which re-raise it (a 500)
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        from .data.store import Store

        store = Store(images, torch.full((len(images),), -1, dtype=torch.int64), [""] * len(images))
        return self.loaded.predict(store)

    def explain(self, images: torch.Tensor, target: int | None) -> tuple[bytes, int]:
        """The Grad-CAM overlay PNG of one image for `target` (default: its predicted class), and that class."""
        from .explanation import _upscale

        ckpt = self.loaded.ckpt
        view = model_view(ckpt, images.to(self.loaded.device))
        x = normalise(ckpt, view)
        if target is None:
            target = int(self.predict(images)[0].argmax())
        cam = grad_cam(self.loaded.model, x, target=torch.tensor([target])).cpu().numpy()[0]
        shown = _upscale(view_uint8(view)[0])
        buffer = io.BytesIO()
        Image.fromarray(overlay(shown, cam)).save(buffer, format="PNG")
        return buffer.getvalue(), target


class BodyLimit:
    """ASGI middleware: a request body above `max_bytes` gets 413 before it is read (Content-Length), or as soon
    as the bytes received pass the limit (a streamed body), so an upload never fills memory or disk."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> str:
        return f"request body larger than the {self.max_bytes / 1e6:g} MB allowed (medclf serve --max-upload-mb)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            status, detail = (413, self.too_large()) if length.isdigit() else (400, "invalid Content-Length header")
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.too_large())
            return message

        await self.app(scope, limited_receive, send)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def run_folder(run_or_model: str | Path) -> Path | None:
    """The run a model belongs to (its folder holds metrics.json), for the manifest and the model card."""
    path = Path(run_or_model)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "metrics.json").is_file() else None


def decision(probs: np.ndarray, classes: list[str], rule: dict) -> str:
    """The class decided at the validation-chosen operating point (arg-max when the run chose none)."""
    if rule.get("threshold") is not None and len(classes) == 2:
        return classes[1] if probs[1] >= rule["threshold"] else classes[0]
    return classes[int(probs.argmax())]


async def read_uploads(files: list[UploadFile], limits: Limits) -> list[tuple[str, bytes]]:
    """The uploaded files' names and bytes, after the count, content-type, size and pixel-count checks."""
    if not files:
        raise HTTPException(422, "no image: send one or more files in the multipart field 'files'")
    if len(files) > limits.max_files:
        raise HTTPException(413, f"{len(files)} files in one request; at most {limits.max_files}")
    uploads = []
    for i, f in enumerate(files):
        name = f.filename or f"image {i + 1}"
        kind = (f.content_type or "").split(";")[0].strip().lower()
        if kind not in ACCEPTED_TYPES:
            raise HTTPException(415, f"{name}: content type {kind!r} is not an image medclf reads; "
                                     "send PNG, JPEG or DICOM")
        data = await f.read()
        if not data:
            raise HTTPException(422, f"{name} is empty")
        _check_pixel_count(name, data, limits.max_pixels)
        uploads.append((name, data))
    return uploads


def _check_pixel_count(name: str, data: bytes, max_pixels: int) -> None:
    """Refuse a decompression bomb from its header, before a pixel is decoded (PIL formats; DICOM is checked
    by its decoder)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # PIL's own refusal, far above any limit medclf sets
        raise HTTPException(413, f"{name}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        size = _dicom_size(data)
        if size is None:
            return  # neither a PIL image nor a DICOM header: decode_image reports it
        width, height = size
    if width * height > max_pixels:
        raise HTTPException(413, f"{name}: {width}×{height} pixels is more than the {max_pixels} allowed")


def _dicom_size(data: bytes) -> tuple[int, int] | None:
    """(columns × frames, rows) from a DICOM upload's header, so that --max-pixels holds for DICOM (a compressed
    one can claim any size); None when the bytes are no DICOM with image dimensions."""
    if data[128:132] != b"DICM":
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows)
    except (InvalidDicomError, AttributeError, EOFError, ValueError, TypeError, KeyError, OSError):
        return None  # the decoder names what is wrong with it


def decode_uploads(ckpt: dict, uploads: list[tuple[str, bytes]]) -> torch.Tensor:
    """The uploads as the model's uint8 N×C×H×W input, decoded exactly as `medclf predict` decodes files."""
    with tempfile.TemporaryDirectory(prefix="medclf-serve-") as tmp:
        paths = []
        for i, (name, data) in enumerate(uploads):
            suffix = re.sub(r"[^A-Za-z0-9.]", "", Path(name).suffix)[:10]  # DICOM is recognised by it too
            path = Path(tmp) / f"upload-{i}{suffix}"
            path.write_bytes(data)
            paths.append(str(path))
        try:
            store = input_store(ckpt, paths)
        except MedclfError as exc:
            message = str(exc)
            for path, (name, _) in zip(paths, uploads):
                message = message.replace(path, name)
            raise HTTPException(422, message.splitlines()[0]) from None
    return store.take(torch.arange(len(store)))


def create_app(run_or_model: str | Path, device: str = "auto", limits: Limits | None = None) -> FastAPI:
    """The service for one model: /predict, /explain, /health, /model, the page at / and the docs at /docs."""
    from .web_page import render_page

    limits = limits or Limits()
    loaded = load_for_inference(run_or_model, device)
    ckpt, classes = loaded.ckpt, loaded.ckpt["classes"]
    run = run_folder(run_or_model)
    manifest = build_manifest(ckpt, run)
    headline = card_headline(run)
    batcher = Batcher(loaded, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker = asyncio.create_task(batcher.work())
        yield
        worker.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="medclf serve", version=manifest["medclf_version"], lifespan=lifespan,
                  description=f"{ckpt['arch']} classifier of {', '.join(classes)}. {headline['intended_use']}")
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")},
                            status_code=422)

    async def decoded(files: list[UploadFile]) -> tuple[list[str], torch.Tensor]:
        uploads = await read_uploads(files, limits)
        images = await asyncio.to_thread(decode_uploads, ckpt, uploads)
        return [name for name, _ in uploads], images

    @app.post("/predict", summary="Class probabilities and the decision for one or more images")
    async def predict(files: list[UploadFile] = File(..., description="PNG, JPEG or DICOM images")) -> dict:
        names, images = await decoded(files)
        probs = await batcher.submit("predict", images)
        results = []
        for name, p in zip(names, probs):
            best = int(p.argmax())
            results.append({"file": name, "probabilities": {c: float(v) for c, v in zip(classes, p)},
                            "prediction": classes[best], "probability": float(p[best]),
                            "decision": decision(p, classes, manifest["decision"]),
                            "threshold": manifest["decision"].get("threshold")})
        return {"results": results, "decision_rule": manifest["decision"]["rule"]}

    @app.post("/explain", summary="Grad-CAM overlay (PNG) of one image", response_class=Response,
              responses={200: {"content": {"image/png": {}}}})
    async def explain(files: list[UploadFile] = File(..., description="one PNG, JPEG or DICOM image"),
                      target: str | None = Query(None, description="class to explain (default: the prediction)")
                      ) -> Response:
        if target is not None and target not in classes:
            raise HTTPException(422, f"target {target!r} is not one of the model's classes: {', '.join(classes)}")
        if len(files) != 1:
            raise HTTPException(422, f"/explain takes one image, got {len(files)}")
        _, images = await decoded(files)
        png, explained = await batcher.submit("explain", images, None if target is None else classes.index(target))
        return Response(png, media_type="image/png", headers={"X-Medclf-Explained-Class": _header_safe(classes[explained])})

    @app.get("/health", summary="Liveness and queue length")
    async def health() -> dict:
        return {"status": "ok", "queued_images": batcher.pending, "queue_limit": limits.queue_images,
                "device": str(loaded.device), "predict_batches": batcher.batches,
                "predicted_images": batcher.batched_images}

    @app.get("/model", summary="The model's manifest and its model card headline")
    async def model() -> dict:
        return {"manifest": manifest, "model_card": headline}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return render_page(manifest, headline, limits.max_upload_bytes)

    return app


def _header_safe(text: str) -> str:
    """A class name as an HTTP header value (latin-1, one line)."""
    return text.encode("latin-1", "replace").decode("latin-1").replace("\n", " ").replace("\r", " ")


def serve(run_or_model: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          limits: Limits | None = None) -> None:
    """Run the service with uvicorn until interrupted (`medclf serve`)."""
    import uvicorn

    app = create_app(run_or_model, device, limits)
    print(f"medclf: serving {run_or_model} on http://{host}:{port}/ (API docs at /docs); Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="warning")
