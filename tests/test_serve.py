"""`minidiff serve` through the real console script and the real `webuiapi` client: AUTOMATIC1111's
endpoints, the pictures equal to `minidiff generate`'s, progress and interrupt, the queue, auth,
Ctrl-C, and hostile requests answered in one line with the server still serving."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import pytest
from conftest import run_cli
from serving import Served

requests = pytest.importorskip("requests")
webuiapi = pytest.importorskip("webuiapi")

from PIL import Image, ImageDraw


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("served")
    served = Served(cwd, "--queue", "2")
    served.cwd = cwd
    yield served
    code = served.stop()
    assert code in (0, 130), served.output()
    assert "Traceback" not in served.output(), served.output()


@pytest.fixture
def api(server):
    client = webuiapi.WebUIApi(port=server.port)
    yield client
    # A test may have left its connection idle past the server's keep-alive; a new one does not race the close.
    client.session.close()
    client.util_set_model("shapes-clip")  # every test starts on the default model


def generated(tmp_path, *args: str) -> list[Image.Image]:
    """The PNGs `minidiff generate ARGS` writes, in order."""
    out = tmp_path / "generated"
    result = run_cli("generate", *args, "-o", f"{out}/", "-q")
    assert result.returncode == 0, result.stderr
    return [Image.open(line.strip()) for line in result.stdout.splitlines() if line.strip()]


def native(image: Image.Image, size: int) -> Image.Image:
    """A nearest-neighbour enlargement back at the model's size: each block's first pixel."""
    step = image.width // size
    return image.resize((size, size), Image.Resampling.NEAREST, box=(0, 0, size * step, size * step)) \
        if step > 1 else image


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def picture(size: int = 80) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 60, 40))
    return image


# -- AUTOMATIC1111's API through webuiapi --------------------------------------------------------------
def test_txt2img_with_webuiapis_defaults_equals_generate(api, tmp_path):
    """webuiapi's defaults: Euler a, 20 steps, CFG 7, eta 1, 512 x 512: pictures, scaled and said so."""
    result = api.txt2img(prompt="a red circle", seed=11)
    (image,) = result.images
    assert image.size == (512, 512)
    assert any("scaled to 512x512" in note for note in result.info["notes"])
    text = image.info["parameters"]
    assert "Sampler: euler-ancestral" in text and "Steps: 20" in text and "Size: 32x32" in text
    (expected,) = generated(tmp_path, "a red circle", "--seed", "11", "--sampler", "euler-ancestral", "--steps", "20",
                            "--cfg", "7", "--eta", "1")
    assert same_pixels(native(image, 32), expected)
    assert image.info["parameters"] == expected.info["parameters"]
    assert json.loads(image.info["minidiff"]) == json.loads(expected.info["minidiff"])


def test_a_batch_at_the_models_size_equals_generates_batch(api, tmp_path):
    result = api.txt2img(prompt="a blue square", seed=7, steps=3, cfg_scale=3, sampler_name="DPM++ 2M Karras",
                         batch_size=2, n_iter=2, width=32, height=32)
    assert [im.size for im in result.images] == [(32, 32)] * 4
    assert result.info["all_seeds"] == [7, 8, 9, 10]
    assert len(result.info["infotexts"]) == 4 and "eta ignored" in " ".join(result.info["notes"])
    expected = generated(tmp_path, "a blue square", "--seed", "7", "--steps", "3", "--cfg", "3", "--sampler",
                         "dpmpp-2m", "-O", "karras=true", "-n", "4", "--batch-size", "2")
    assert all(same_pixels(a, b) for a, b in zip(result.images, expected))


def test_img2img_and_inpainting_equal_generate(api, tmp_path):
    init = picture()
    init.save(tmp_path / "in.png")
    mask = Image.new("L", init.size)
    ImageDraw.Draw(mask).rectangle((0, 0, 39, 79), fill=255)
    mask.save(tmp_path / "mask.png")
    shared = dict(prompt="a green circle", seed=3, steps=4, cfg_scale=3, sampler_name="DDIM", eta=0, width=0, height=0)
    result = api.img2img(images=[init], denoising_strength=0.6, **shared)
    assert any("scaled to 32x32" in note for note in result.info["notes"])
    (expected,) = generated(tmp_path, "a green circle", "--seed", "3", "--steps", "4", "--cfg", "3",
                            "--init-image", str(tmp_path / "in.png"), "--strength", "0.6", "--eta", "0")
    assert same_pixels(result.images[0], expected)
    inpainted = api.img2img(images=[init], mask_image=mask, denoising_strength=1.0, **shared)
    (expected,) = generated(tmp_path, "a green circle", "--seed", "3", "--steps", "4", "--cfg", "3",
                            "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--eta", "0")
    assert same_pixels(inpainted.images[0], expected)
    assert "Mask hash" in inpainted.images[0].info["parameters"]


def test_samplers_models_and_switching_to_emoji(api):
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "ddim", "lcm"} <= set(names)
    models = api.get_sd_models()
    assert {m["model_name"] for m in models} >= {"shapes-clip", "emoji", "shapes-fast", "emoji-fast"}
    assert all("/" not in m["filename"] and len(m["sha256"]) == 64 for m in models)
    assert api.util_get_current_model().startswith("shapes-clip [")
    api.util_set_model("emoji")
    assert api.util_get_current_model().startswith("emoji [")
    result = api.txt2img(prompt="red apple", steps=2, seed=1, width=0, height=0)
    assert result.images[0].size == (64, 64) and result.info["sd_model_name"] == "emoji"
    # A request may name its own model without changing the server's.
    other = api.txt2img(prompt="a red circle", steps=2, width=0, height=0,
                        override_settings={"sd_model_checkpoint": "shapes-fast"})
    assert other.images[0].size == (32, 32) and other.info["sd_model_name"] == "shapes-fast"
    assert api.util_get_current_model().startswith("emoji [")


def test_png_info_reads_the_parameters_back(api):
    image = api.txt2img(prompt="a pink triangle", negative_prompt="a circle", steps=2, seed=4).images[0]
    info = api.png_info(image)
    assert info.info.startswith("a pink triangle\nNegative prompt: a circle\nSteps: 2")
    assert info.json["parameters"]["Seed"] == "4" and "minidiff" in info.json["items"]


def test_the_lists_a_client_probes_are_empty_and_valid(api, server):
    assert api.get_loras() == [] and api.get_upscalers() == [] and api.get_sd_vae() == []
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert requests.get(f"{server.url}/sdapi/v1/hypernetworks?kind=loras", timeout=10).json() == []


def test_openai_generations(server):
    answer = requests.post(f"{server.url}/v1/images/generations", timeout=120,
                           json={"prompt": "a yellow square", "n": 2, "size": "64x64", "response_format": "b64_json"})
    assert answer.status_code == 200, answer.text
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in answer.json()["data"]]
    assert [im.size for im in images] == [(64, 64)] * 2 and "a yellow square" in images[0].info["parameters"]


def test_progress_while_a_job_runs_then_interrupt_answers_with_what_it_has(api):
    answers = []
    thread = threading.Thread(target=lambda: answers.append(api.txt2img(prompt="a red circle", steps=1000, seed=2,
                                                                         sampler_name="DDIM", width=0, height=0)))
    thread.start()
    deadline, progress = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
            break
        time.sleep(0.1)
    assert progress["state"]["sampling_steps"] == 1000 and 0 < progress["progress"] < 1, progress
    assert progress["state"]["job_count"] >= 1 and progress["eta_relative"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (32, 32)
    api.interrupt()
    thread.join(120)
    assert not thread.is_alive()
    (result,) = answers
    assert result.info["interrupted"] is True and len(result.images) == 1
    assert any(note.startswith("interrupted at step") for note in result.info["notes"])


def test_a_full_queue_is_503_with_retry_after_and_clients_that_leave_lose_nothing_of_others(server):
    """--queue 2: one job runs, two wait, the next is refused; the three clients leave and the next one is served."""
    body = {"prompt": "a red circle", "steps": 1000, "width": 0, "height": 0}

    def leave_early():
        try:
            requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=6)
        except requests.RequestException:
            pass  # the client gives up: its job is dropped

    threads = [threading.Thread(target=leave_early) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and requests.get(f"{server.url}/sdapi/v1/progress", timeout=5).json()[
            "state"]["job_count"] < 3:
        time.sleep(0.05)
    refused = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=30)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
    assert "waiting" in refused.json()["detail"]
    for thread in threads:
        thread.join(60)
    served = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=120,
                           json={"prompt": "a red circle", "steps": 2, "width": 0, "height": 0})
    assert served.status_code == 200, served.text


def test_an_idle_connection_outlives_uvicorns_five_seconds(server):
    """Kept 30 s, as AUTOMATIC1111 keeps it: a client pausing between requests reuses its connection
    instead of racing the server's close ("connection reset by peer")."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", "/sdapi/v1/options")
    assert connection.getresponse().read() and connection.sock is not None
    first = connection.sock
    time.sleep(6)
    connection.request("GET", "/sdapi/v1/options")  # on a closed connection this raises RemoteDisconnected
    assert connection.getresponse().status == 200 and connection.sock is first
    connection.close()


def test_nothing_is_written_without_save_dir(server):
    assert [p for p in server.cwd.rglob("*")] == []


# -- hostile requests: the right status, one line, and the server serves on -----------------------------
def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


IMG = _b64(_png_claiming(8, 8))
HOSTILE = {
    "huge steps": ("txt2img", {"prompt": "x", "steps": 10**9}, 422, "steps"),
    "no such sampler": ("txt2img", {"prompt": "x", "steps": 1000, "sampler_name": "nope"}, 422, "sampler"),
    "negative seed": ("txt2img", {"prompt": "x", "seed": -2}, 422, "seed"),
    "half a size": ("txt2img", {"prompt": "x", "width": 512}, 422, "both width and height"),
    "wrong type": ("txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    "NaN cfg": ("txt2img", '{"prompt": "x", "cfg_scale": NaN}', 422, "cfg_scale"),
    "not JSON": ("txt2img", "{prompt", 422, "JSON"),
    "too many images": ("txt2img", {"prompt": "x", "batch_size": 16, "n_iter": 16}, 422, "at most 16"),
    "huge output": ("txt2img", {"prompt": "x", "batch_size": 16, "width": 2048, "height": 2048}, 422, "pixels"),
    "long prompt": ("txt2img", {"prompt": "x" * 10_001}, 422, "prompt"),
    "unknown model": ("txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}, 422,
                      "unknown model"),
    "path-like model": ("txt2img", {"prompt": "x", "override_settings": {
        "sd_model_checkpoint": "../minidiff_cli/models/emoji.safetensors"}}, 422, "unknown model"),
    "absolute path model": ("options", {"sd_model_checkpoint": "/etc/passwd"}, 422, "unknown model"),
    "missing init image": ("img2img", {"prompt": "x"}, 422, "init_images"),
    "non-image": ("img2img", {"prompt": "x", "init_images": [_b64(b"hello, not a picture")]}, 422, "not a PNG"),
    "not base64": ("img2img", {"prompt": "x", "init_images": ["%%%"]}, 422, "base64"),
    "base64 bomb": ("img2img", {"prompt": "x", "init_images": [_b64(_png_claiming(100_000, 100_000))]}, 422,
                    "pixels"),
    "mask of another size": ("img2img", {"prompt": "x", "init_images": [_b64(_png_claiming(8, 8))],
                                         "mask": _b64(_png_claiming(9, 9))}, 422, None),
    "png-info of a non-PNG": ("png-info", {"image": _b64(b"GIF89a")}, 422, "PNG"),
    "unknown sampler": ("txt2img", {"prompt": "x", "sampler_name": "LMS Exponential"}, 422, "sampler"),
}


@pytest.mark.hostile
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_requests_are_one_line_refusals(server, name):
    endpoint, body, status, fragment = HOSTILE[name]
    url = f"{server.url}/sdapi/v1/{endpoint}"
    if isinstance(body, str):
        answer = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        answer = requests.post(url, json=body, timeout=60)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in answer.text, answer.text
    assert fragment is None or fragment in detail, detail
    assert requests.get(f"{server.url}/sdapi/v1/options", timeout=10).status_code == 200


@pytest.mark.hostile
def test_oversized_bodies_are_413_declared_or_streamed(server):
    big = b'{"prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    declared = requests.post(f"{server.url}/sdapi/v1/txt2img", data=big, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and "16 MB" in declared.json()["detail"]
    streamed = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=60, headers={"Content-Type": "application/json"},
                             data=(big[i:i + 1 << 20] for i in range(0, len(big), 1 << 20)))  # chunked: no length
    assert streamed.status_code == 413
    assert requests.get(f"{server.url}/sdapi/v1/options", timeout=10).status_code == 200


@pytest.mark.hostile
def test_page_files_come_from_a_fixed_list(server):
    assert requests.get(f"{server.url}/", timeout=10).text.startswith("<!doctype html>")
    assert requests.get(f"{server.url}/page/app.js", timeout=10).status_code == 200
    for name in ("..%2F__init__.py", "index.html", "..%2F..%2Fcli%2Fserve.py"):
        assert requests.get(f"{server.url}/page/{name}", timeout=10).status_code == 404


# -- auth, --save-dir, CORS, and Ctrl-C ------------------------------------------------------------------
def test_token_basic_auth_save_dir_cors_and_ctrl_c(tmp_path):
    saved = tmp_path / "saved"
    served = Served(tmp_path, "--token", "sesame", "--api-auth", "ali:baba", "--save-dir", str(saved),
                    "--cors", "http://example.test", "--model", "shapes-fast")
    try:
        url = served.url
        assert requests.get(f"{url}/", timeout=10).status_code == 200  # the page itself is open
        refused = requests.get(f"{url}/sdapi/v1/sd-models", timeout=10)
        assert refused.status_code == 401 and "Bearer" in refused.headers["WWW-Authenticate"]
        wrong = requests.get(f"{url}/sdapi/v1/sd-models", headers={"Authorization": "Bearer open"}, timeout=10)
        assert wrong.status_code == 401
        bearer = requests.get(f"{url}/sdapi/v1/sd-models", headers={"Authorization": "Bearer sesame"}, timeout=10)
        assert bearer.status_code == 200
        api = webuiapi.WebUIApi(port=served.port, username="ali", password="baba")
        result = api.txt2img(prompt="a red circle", width=0, height=0)  # webuiapi's Euler a, on a student too
        assert result.images[0].size == (32, 32)
        assert len(list(saved.glob("minidiff-*.png"))) == 1
        preflight = requests.options(f"{url}/sdapi/v1/txt2img", timeout=10, headers={
            "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.headers.get("access-control-allow-origin") == "http://example.test"
        other = requests.get(f"{url}/", headers={"Origin": "http://elsewhere.test"}, timeout=10)
        assert "access-control-allow-origin" not in other.headers
        # Ctrl-C during a job: the job answers with what it has, and the server stops cleanly.
        answers = []
        thread = threading.Thread(target=lambda: answers.append(requests.post(
            f"{url}/sdapi/v1/txt2img", auth=("ali", "baba"), timeout=120,
            json={"prompt": "a red circle", "steps": 1000, "sampler_name": "DDIM", "width": 0, "height": 0})))
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and requests.get(f"{url}/sdapi/v1/progress", auth=("ali", "baba"),
                                                           timeout=10).json()["state"]["sampling_step"] < 1:
            time.sleep(0.1)
    finally:
        code = served.stop()
    thread.join(60)
    assert code in (0, 130), served.output()
    assert "Traceback" not in served.output(), served.output()
    (answer,) = answers
    assert answer.status_code == 200 and json.loads(answer.json()["info"])["interrupted"] is True


def test_cors_is_off_by_default(server):
    answer = requests.options(f"{server.url}/sdapi/v1/txt2img", timeout=10, headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in answer.headers


def test_an_open_address_without_a_token_is_a_loud_warning(capsys):
    from types import SimpleNamespace

    from minidiff_cli.cli.serve import _banner, _is_local

    assert _is_local("127.0.0.1") and _is_local("::1") and _is_local("localhost") and not _is_local("0.0.0.0")
    entry = SimpleNamespace(name="shapes-clip", where="shipped", hash="0123456789")
    pipe = SimpleNamespace(model=SimpleNamespace(image_size=32), device="cpu", dtype="torch.float32")
    _banner("0.0.0.0", 7860, entry, pipe, None, None, None, None)
    assert "WARNING: listening on 0.0.0.0 without --token" in capsys.readouterr().err
    _banner("0.0.0.0", 7860, entry, pipe, "t", None, None, None)
    assert "WARNING" not in capsys.readouterr().err


def test_bad_flags_are_one_line_before_anything_loads(tmp_path):
    from conftest import assert_one_line_error

    assert_one_line_error(run_cli("serve", "--port", "0"), "--port")
    assert_one_line_error(run_cli("serve", "--api-auth", "nopassword"), "USER:PASSWORD")
    assert_one_line_error(run_cli("serve", "--cors", "example.test"), "--cors")
    assert_one_line_error(run_cli("serve", "--model", "nope", "--port", "1"), "")


def test_the_readmes_webuiapi_script_runs_unchanged(server, tmp_path):
    """README.md's webuiapi example, as written (but for the port), against the running server."""
    import re
    import subprocess
    import sys

    from conftest import ROOT

    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    (script,) = [block for block in blocks if "import webuiapi" in block]
    assert "port=7860" in script
    try:
        result = subprocess.run([sys.executable, "-c", script.replace("port=7860", f"port={server.port}")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        webuiapi.WebUIApi(port=server.port).util_set_model("shapes-clip")
    assert result.returncode == 0, result.stderr
    assert "scaled to 512x512" in result.stdout
    assert Image.open(tmp_path / "circle.png").size == Image.open(tmp_path / "apple.png").size == (512, 512)
