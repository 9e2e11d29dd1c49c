"""`medclf serve`: the API through FastAPI's TestClient, a real uvicorn process under load, the page in Chromium."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import make_split_folder
from dicomfiles import write_kind
from htmlcheck import REQUIRED
from medclf import serving
from medclf.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    data = make_split_folder(root / "xray")
    assert main(["train", str(data), "--epochs", "1", "--batch-size", "16", "--patience", "0", "--folds", "0",
                 "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def images(run) -> dict[str, bytes]:
    """A test image as PNG and JPEG bytes, and the path of the PNG."""
    path = Path(run).parent / "xray" / "test" / "PNEUMONIA" / "PNEUMONIA_0.png"
    jpeg = io.BytesIO()
    Image.open(path).resize((64, 64)).save(jpeg, format="JPEG", quality=95)
    return {"png": path.read_bytes(), "jpeg": jpeg.getvalue(), "png_path": str(path)}


@pytest.fixture(scope="module")
def client(run):
    app = serving.create_app(run, device="cpu", limits=serving.Limits(max_upload_bytes=300_000))
    with TestClient(app) as c:
        yield c


def upload(name: str, data: bytes, kind: str = "image/png") -> list:
    return [("files", (name, data, kind))]


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    return detail


def test_predict_png_equals_medclf_predict(client, images, run, tmp_path):
    from medclf import predict

    got = client.post("/predict", files=upload("x.png", images["png"])).json()["results"][0]
    expected = predict(str(run), [images["png_path"]], out=None, device="cpu")[0]
    classes = ["NORMAL", "PNEUMONIA"]
    np.testing.assert_allclose([got["probabilities"][c] for c in classes], [expected[f"prob_{c}"] for c in classes],
                               rtol=0, atol=1e-6)
    assert got["prediction"] == expected["prediction"] and got["file"] == "x.png"
    threshold = json.loads((run / "metrics.json").read_text())["val"]["threshold"]["value"]
    assert got["threshold"] == pytest.approx(threshold)
    assert got["decision"] == ("PNEUMONIA" if got["probabilities"]["PNEUMONIA"] >= threshold else "NORMAL")


def test_predict_jpeg_and_several_images(client, images):
    files = upload("a.jpg", images["jpeg"], "image/jpeg") + upload("b.png", images["png"])
    results = client.post("/predict", files=files).json()["results"]
    assert [r["file"] for r in results] == ["a.jpg", "b.png"]
    for r in results:
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)


def test_predict_dicom(client, run, tmp_path):
    gray = np.asarray(Image.open(run.parent / "xray" / "test" / "NORMAL" / "NORMAL_1.png"))
    path = write_kind(tmp_path / "scan.dcm", gray, "mono12")
    as_dicom = client.post("/predict", files=upload("scan.dcm", path.read_bytes(), "application/dicom")).json()
    png = io.BytesIO()
    Image.fromarray(gray).save(png, format="PNG")
    as_png = client.post("/predict", files=upload("scan.png", png.getvalue())).json()
    assert as_dicom["results"][0]["probabilities"] == pytest.approx(as_png["results"][0]["probabilities"], abs=1e-6)


def test_explain_returns_the_gradcam_png(client, images):
    response = client.post("/explain", files=upload("x.png", images["png"]))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.mode == "RGB" and min(picture.size) >= 224  # the 12 px input shown upscaled
    predicted = client.post("/predict", files=upload("x.png", images["png"])).json()["results"][0]["prediction"]
    assert response.headers["x-medclf-explained-class"] == predicted
    other = client.post("/explain?target=NORMAL", files=upload("x.png", images["png"]))
    assert other.headers["x-medclf-explained-class"] == "NORMAL"
    one_line_error(client.post("/explain?target=CAT", files=upload("x.png", images["png"])), 422)
    one_line_error(client.post("/explain", files=upload("a.png", images["png"]) * 2), 422)


@pytest.mark.parametrize("files, status, says", [
    (upload("notes.txt", b"hello", "text/plain"), 415, "content type"),
    (upload("broken.png", b"\x89PNG not really"), 422, "cannot read image broken.png"),
    (upload("empty.png", b""), 422, "empty"),
    (None, 422, "files"),
])
def test_bad_uploads_get_one_line_4xx(client, files, status, says):
    detail = one_line_error(client.post("/predict", files=files) if files else client.post("/predict"), status)
    assert says in detail and "/tmp" not in detail


def test_too_big_upload_gets_413(client):
    detail = one_line_error(client.post("/predict", files=upload("big.png", b"x" * 400_000)), 413)
    assert "0.3 MB" in detail

    def streamed():  # no Content-Length: the limit counts the bytes as they arrive
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(40):
            yield b"x" * 10_000
        yield b"\r\n--b--\r\n"

    one_line_error(client.post("/predict", content=streamed(),
                               headers={"content-type": "multipart/form-data; boundary=b"}), 413)


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height gray pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side, says", [(8_000, "8000×8000 pixels is more than the 50000000 allowed"),
                                        (20_000, "decompression bomb")])  # above PIL's own limit too
def test_decompression_bomb_is_refused_before_decoding(client, side, says):
    detail = one_line_error(client.post("/predict", files=upload("bomb.png", png_bomb(side, side))), 413)
    assert says in detail


def test_dicom_claiming_too_many_pixels_is_refused_like_a_png(client, tmp_path):
    path = write_kind(tmp_path / "big.dcm", np.zeros((8, 8), np.uint8), "mono8")
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 8_000, 8_000  # the header's claim; --max-pixels must hold before any decoding
    ds.save_as(path)
    detail = one_line_error(client.post("/predict", files=upload("big.dcm", path.read_bytes(), "application/dicom")),
                            413)
    assert "8000×8000 pixels is more than the 50000000 allowed" in detail


@pytest.fixture
def blocked_worker(monkeypatch):
    """The worker's forward pass waits for `release`; `started` is set when the first one begins."""
    release, started = threading.Event(), threading.Event()
    real = serving.Batcher.predict

    def slow(self, batch):
        started.set()
        release.wait(30)
        return real(self, batch)

    monkeypatch.setattr(serving.Batcher, "predict", slow)
    yield release, started
    release.set()


@contextlib.contextmanager
def first_request_running(run, images, started: threading.Event, queue_images: int, clients: int):
    """A service whose first /predict request is running (held by `blocked_worker`): (app, client, pool, future)."""
    app = serving.create_app(run, device="cpu", limits=serving.Limits(queue_images=queue_images))
    with TestClient(app) as c, ThreadPoolExecutor(clients) as pool:
        first = pool.submit(c.post, "/predict", files=upload("a.png", images["png"]))
        assert started.wait(30)
        yield app, c, pool, first


def test_waiting_requests_run_as_one_batch(run, images, blocked_worker):
    release, started = blocked_worker
    with first_request_running(run, images, started, queue_images=10, clients=3) as (app, c, pool, first):
        waiting = [pool.submit(c.post, "/predict", files=upload(f"{i}.png", images["png"]) * 2) for i in range(2)]
        for _ in range(300):  # until both are queued behind the running one
            if app.state.batcher.pending == 5:
                break
            time.sleep(0.05)
        release.set()
        assert [r.result(30).status_code for r in (first, *waiting)] == [200] * 3
        health = c.get("/health").json()
    assert health["predict_batches"] == 2 and health["predicted_images"] == 5  # the 2 waiting requests: 1 batch


def test_queue_full_gets_503(run, images, blocked_worker):
    release, started = blocked_worker
    with first_request_running(run, images, started, queue_images=1, clients=1) as (_, c, _, first):
        detail = one_line_error(c.post("/predict", files=upload("b.png", images["png"])), 503)
        assert "busy" in detail
        release.set()
        assert first.result(30).status_code == 200
        assert c.post("/predict", files=upload("c.png", images["png"])).status_code == 200  # room again


def test_model_and_health_and_docs(client, run):
    body = client.get("/model").json()
    metrics = json.loads((run / "metrics.json").read_text())
    assert body["manifest"]["classes"] == ["NORMAL", "PNEUMONIA"]
    assert body["manifest"]["decision"]["threshold"] == pytest.approx(metrics["val"]["threshold"]["value"])
    assert body["model_card"]["splits"]["val"]["accuracy"] == metrics["val"]["accuracy"]
    assert body["model_card"]["estimate"]["auc"] == metrics["estimate"]["auc"]
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200 and "/predict" in client.get("/openapi.json").text


def test_page_states_intended_use_and_metrics_without_network(client, run):
    page = client.get("/").text
    metrics = json.loads((run / "metrics.json").read_text())
    assert "Intended use" in page and "Not a medical device" in page
    assert f"{metrics['val']['accuracy']:.3f}" in page and f"{metrics['estimate']['auc']['value']:.3f}" in page
    assert "http://" not in page and "https://" not in page  # no CDN: the page works offline


def test_serve_binds_localhost_by_default():
    import inspect

    from medclf.cli import get_args_parser

    assert get_args_parser().parse_args(["serve", "run"]).host == "127.0.0.1"
    assert inspect.signature(serving.serve).parameters["host"].default == "127.0.0.1"


def test_serve_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert main(["serve", str(tmp_path), "--queue", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("medclf: error:") for line in err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run):
    """`medclf serve RUN` as a real uvicorn process on 127.0.0.1; yields its base URL."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "medclf", "serve", str(run), "--port", str(port),
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"medclf serve exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def test_uvicorn_under_load(server, images):
    """300 requests from 8 concurrent clients: zero errors; prints p50/p95 latency and throughput."""
    import httpx

    def one(client: httpx.Client) -> tuple[int, float]:
        start = time.perf_counter()
        response = client.post(f"{server}/predict", files=upload("x.png", images["png"]))
        return response.status_code, time.perf_counter() - start

    def worker(n: int) -> list[tuple[int, float]]:
        with httpx.Client(timeout=60) as client:
            return [one(client) for _ in range(n)]

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        outcomes = [o for part in pool.map(worker, [38] * 4 + [37] * 4) for o in part]
    elapsed = time.perf_counter() - start
    codes = [code for code, _ in outcomes]
    latency = np.array([t for _, t in outcomes]) * 1000
    print(f"\nload: {len(outcomes)} requests, 8 clients: p50 {np.percentile(latency, 50):.0f} ms, "
          f"p95 {np.percentile(latency, 95):.0f} ms, {len(outcomes) / elapsed:.0f} requests/s")
    assert len(outcomes) == 300 and codes.count(200) == 300, {c: codes.count(c) for c in set(codes)}


CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser"))), None)  # first found
needs_browser = pytest.mark.skipif((CHROMEDRIVER is None or CHROMIUM is None) and not REQUIRED,
                                   reason="Chromium and chromedriver not installed (Debian: chromium chromium-driver)")


@needs_browser
def test_page_in_headless_chromium(server, images, tmp_path):
    """Upload an image on the page, read its prediction and Grad-CAM from the page, save a screenshot."""
    import httpx
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"{server}/")
        assert "Intended use" in driver.find_element(By.TAG_NAME, "main").text
        driver.find_element(By.ID, "files").send_keys(images["png_path"])
        card = WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".card[data-state]"))
        WebDriverWait(driver, 60).until(lambda d: card.get_attribute("data-state") == "done")
        expected = httpx.post(f"{server}/predict", files=upload("x.png", images["png"])).json()["results"][0]
        assert card.get_attribute("data-prediction") == expected["prediction"]
        assert f"Decision: {expected['decision']}" in card.text
        shown = {b.find_element(By.CLASS_NAME, "class").text: float(b.find_element(By.CLASS_NAME, "prob").text)
                 for b in card.find_elements(By.CLASS_NAME, "bar")}
        assert shown == pytest.approx(expected["probabilities"], abs=5e-4)
        cam = card.find_element(By.CLASS_NAME, "gradcam")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", cam))
        assert driver.execute_script("return arguments[0].naturalWidth", cam) >= 224
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
        print(f"\nscreenshot: {shot}")
    finally:
        driver.quit()
