"""The accelerator drill checks (drtool/drill/gpu.py) against real torch and real ffmpeg.

No GPU exists on these machines (no CUDA/ROCm/XPU device, no /dev/dri render node). So the
GPU paths are exercised for their refusal: a matmul that fell back to the CPU is never a
GPU pass, an explicit cuda/rocm/xpu device is "not available", and a VAAPI/QSV transcode
fails naming the missing device with ffmpeg's own error. The CPU and software paths run
for real: a real torch (CPU build) matmul checked against its float64 reference, and a real
ffmpeg software encode whose output ffprobe counts frame by frame. The device *selection*
among CUDA, ROCm/HIP and XPU is also checked against a stand-in torch namespace, labelled
as such, since no real one can report a GPU here.

No model server runs here either: the inference endpoint is a local stub HTTP server on
127.0.0.1 speaking the OpenAI API shape (POST /v1/chat/completions, /v1/embeddings), so
these tests prove the request drtool sends and how it judges answers, not a model.

torch, ffmpeg and ffprobe come from scripts/install-deps.sh; missing, the tests skip on a
laptop and fail under DRTOOL_TEST_REQUIRE=all.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import missing, require
from drtool.drill import gpu
from drtool.drill.model import GpuComputeCheck, GpuInferenceCheck, TranscodeCheck


def ctx(tmp_path: Path) -> types.SimpleNamespace:
    """The part of a StepContext these checks use: the scratch dir and the restored tree."""
    work, target = tmp_path / "work", tmp_path / "restored"
    work.mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    return types.SimpleNamespace(work=work, target=target)


# ----------------------------------------------------------------------------- gpu-compute

@pytest.fixture(scope="module")
def torch_mod():
    try:
        import torch
    except ImportError as exc:
        missing("torch", str(exc))
    return torch


def test_auto_without_gpu_is_labelled_cpu_fallback_and_not_a_pass(torch_mod, tmp_path):
    ok, msg, detail = gpu.gpu_compute(GpuComputeCheck(), ctx(tmp_path))  # auto, 2048×2048 float32
    assert not ok
    assert "no GPU" in msg and "CPU fallback" in msg and "not a GPU pass" in msg and "result correct" in msg
    assert detail["backend"] == "cpu" and detail["size"] == 2048
    assert detail["tflops"] > 0 and detail["seconds"] > 0  # the math really ran
    assert detail["rel_error"] < 1e-5  # float32 against the float64 reference


def test_cpu_fallback_stays_short_for_a_big_half_precision_spec(torch_mod, tmp_path):
    # a GPU-sized spec: on the CPU, 8192² float16 would take many minutes; the fallback runs 2048² float32
    ok, msg, detail = gpu.gpu_compute(GpuComputeCheck(size=8192, dtype="float16", min_tflops=20), ctx(tmp_path))
    assert not ok and "CPU fallback (2048×2048 float32:" in msg and "not a GPU pass" in msg
    assert (detail["size"], detail["dtype"]) == (2048, "float32")


def test_explicit_cpu_passes_and_says_cpu(torch_mod, tmp_path):
    ok, msg, detail = gpu.gpu_compute(GpuComputeCheck(device="cpu", size=512), ctx(tmp_path))
    assert ok, msg
    assert msg.startswith("CPU (") and "TFLOP/s" in msg
    assert detail["backend"] == "cpu" and detail["tflops"] > 0 and detail["rel_error"] < 1e-5
    assert detail["device"]  # the CPU's model name


def test_cpu_bfloat16_within_tolerance(torch_mod, tmp_path):
    ok, msg, detail = gpu.gpu_compute(GpuComputeCheck(device="cpu", size=256, dtype="bfloat16"), ctx(tmp_path))
    assert ok, msg
    assert 0 < detail["rel_error"] < 1e-2  # bfloat16 output rounding shows, within the default tolerance


@pytest.mark.parametrize("device", ["cuda", "rocm", "xpu"])
def test_explicit_gpu_device_is_not_available(torch_mod, tmp_path, device):
    ok, msg, detail = gpu.gpu_compute(GpuComputeCheck(device=device, size=64), ctx(tmp_path))
    assert not ok
    assert f"device {device} is not available" in msg
    assert "tflops" not in detail  # refused before any math


def test_absurd_floor_fails_naming_it(torch_mod, tmp_path):
    ok, msg, _ = gpu.gpu_compute(GpuComputeCheck(device="cpu", size=512, min_tflops=1e6), ctx(tmp_path))
    assert not ok
    assert "below the floor of 1e+06 TFLOP/s" in msg and msg.startswith("CPU (")


def test_wrong_result_fails(torch_mod, tmp_path):
    # a tolerance no float32 matmul meets stands in for a device that computes wrongly
    ok, msg, detail = gpu.gpu_compute(GpuComputeCheck(device="cpu", size=256, tolerance=1e-30), ctx(tmp_path))
    assert not ok and "result WRONG" in msg and detail["rel_error"] > 1e-30


def test_missing_torch_is_a_clear_failure(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    ok, msg, _ = gpu.gpu_compute(GpuComputeCheck(), ctx(tmp_path))
    assert not ok and msg == "torch is not installed: pip install 'drtool[gpu]'"


def fake_torch(cuda: bool = False, hip: str | None = None, cuda_ver: str | None = None, xpu: bool = False) -> Any:
    """A stand-in for the torch namespace as a GPU build reports it (none exists here)."""
    return types.SimpleNamespace(
        __version__="2.13.0+fake",
        version=types.SimpleNamespace(hip=hip, cuda=cuda_ver),
        cuda=types.SimpleNamespace(is_available=lambda: cuda, get_device_name=lambda i=0: "AMD Radeon 780M" if hip else "NVIDIA L4"),
        xpu=types.SimpleNamespace(is_available=lambda: xpu, get_device_name=lambda i=0: "Intel Arc A770"),
    )


def test_pick_device_selection_on_stand_in_builds():
    assert gpu.pick_device(fake_torch(cuda=True, cuda_ver="12.8"), "auto") == gpu.Device("cuda", "cuda", "NVIDIA L4")
    assert gpu.pick_device(fake_torch(cuda=True, hip="7.0"), "auto") == gpu.Device("cuda", "hip", "AMD Radeon 780M")
    assert gpu.pick_device(fake_torch(cuda=True, hip="7.0"), "rocm").backend == "hip"
    assert gpu.pick_device(fake_torch(xpu=True), "auto") == gpu.Device("xpu", "xpu", "Intel Arc A770")
    assert gpu.pick_device(fake_torch(), "auto").backend == "cpu"
    with pytest.raises(gpu.DeviceUnavailable, match="drives AMD GPUs"):
        gpu.pick_device(fake_torch(cuda=True, hip="7.0"), "cuda")
    with pytest.raises(gpu.DeviceUnavailable, match="not a ROCm/HIP build"):
        gpu.pick_device(fake_torch(cuda=True, cuda_ver="12.8"), "rocm")
    with pytest.raises(gpu.DeviceUnavailable, match="xpu is not available"):
        gpu.pick_device(fake_torch(cuda=True, cuda_ver="12.8"), "xpu")


def test_gpu_verdict_labels_the_device():
    spec = GpuComputeCheck(min_tflops=10)
    dev = gpu.Device("cuda", "hip", "AMD Radeon 780M")
    ok, msg, _ = gpu.judge_compute(spec, dev, {"tflops": 12.5, "rel_error": 1e-6, "seconds": 0.001}, {})
    assert ok and msg.startswith("AMD Radeon 780M (hip)") and "above the 10 TFLOP/s floor" in msg
    ok, msg, _ = gpu.judge_compute(spec, dev, {"tflops": 3.0, "rel_error": 1e-6, "seconds": 0.005}, {})
    assert not ok and "below the floor of 10 TFLOP/s" in msg


# --------------------------------------------------------------------------- gpu-inference

class Stub:
    """A local OpenAI-shaped endpoint: ``answer(path, status, body, delay)`` sets what a POST
    to /v1/<path> returns; ``requests`` records what drtool sent."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, Any, float]] = {}
        self.requests: list[tuple[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                stub.requests.append((self.path, body))
                status, reply, delay = stub.routes.get(self.path, (404, {"error": {"message": f"no route {self.path}"}}, 0))
                time.sleep(delay)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, path: str, status: int = 200, body: Any = None, delay: float = 0.0) -> None:
        self.routes["/v1/" + path] = (status, body, delay)

    def chat(self, content: str, **kw: Any) -> None:
        self.answer("chat/completions", body={"object": "chat.completion", "model": "llama3.2:1b",
                                              "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                           "finish_reason": "stop"}]}, **kw)

    def embedding(self, vec: list[float]) -> None:
        self.answer("embeddings", body={"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vec}]})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.stop()


def chat_spec(stub: Stub, **kw: Any) -> GpuInferenceCheck:
    return GpuInferenceCheck(url=stub.url, model="llama3.2:1b", prompt="Reply with the word ready.", **kw)


def emb_spec(stub: Stub, **kw: Any) -> GpuInferenceCheck:
    return GpuInferenceCheck(url=stub.url, model="clip", embedding_input="a photo of a cat", golden=[0.1, 0.2, 0.3, 0.4], **kw)


def test_chat_passes_and_sends_a_deterministic_request(stub, tmp_path):
    stub.chat("Ready.")
    ok, msg, detail = gpu.gpu_inference(chat_spec(stub, expect_regex="(?i)ready", latency_ms=5000), ctx(tmp_path))
    assert ok, msg
    assert "llama3.2:1b" in msg and "'Ready.'" in msg
    assert detail["status"] == 200 and 0 < detail["latency_ms"] < 5000 and detail["answer"] == "Ready."
    path, body = stub.requests[-1]
    assert path == "/v1/chat/completions"
    assert body == {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Reply with the word ready."}],
                    "temperature": 0, "seed": 0, "stream": False}


def test_chat_regex_mismatch_fails(stub, tmp_path):
    stub.chat("I cannot help with that.")
    ok, msg, _ = gpu.gpu_inference(chat_spec(stub, expect_regex="(?i)ready"), ctx(tmp_path))
    assert not ok and "does not match /(?i)ready/" in msg and "I cannot help" in msg


def test_chat_over_latency_budget_fails(stub, tmp_path):
    stub.chat("ready", delay=0.3)
    ok, msg, detail = gpu.gpu_inference(chat_spec(stub, expect_regex="ready", latency_ms=50), ctx(tmp_path))
    assert not ok and "over the 50 ms budget" in msg
    assert detail["latency_ms"] >= 300


def test_chat_non_200_fails_with_the_servers_message(stub, tmp_path):
    stub.answer("chat/completions", status=500, body={"error": {"message": "model 'llama3.2:1b' not found, try pulling it first"}})
    ok, msg, detail = gpu.gpu_inference(chat_spec(stub), ctx(tmp_path))
    assert not ok and "HTTP 500" in msg and "not found, try pulling it first" in msg
    assert detail["status"] == 500


def test_chat_response_without_choices_fails(stub, tmp_path):
    stub.answer("chat/completions", body={"object": "chat.completion", "choices": []})
    ok, msg, _ = gpu.gpu_inference(chat_spec(stub), ctx(tmp_path))
    assert not ok and "no choices[0].message.content" in msg


def test_timeout_fails(stub, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "INFERENCE_TIMEOUT_S", 0.3)
    stub.chat("ready", delay=1.0)
    ok, msg, _ = gpu.gpu_inference(chat_spec(stub), ctx(tmp_path))
    assert not ok and "timed out" in msg


def test_unreachable_endpoint_fails(tmp_path):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = GpuInferenceCheck(url=f"http://127.0.0.1:{port}/v1", model="m", prompt="hi")
    ok, msg, _ = gpu.gpu_inference(spec, ctx(tmp_path))
    assert not ok and "failed" in msg and "refused" in msg.lower()


def test_bad_url_and_regex_are_refused_before_any_request(tmp_path):
    """The drill file's validation refuses them (file:line errors); the check itself
    refuses them too when given a spec built without validation."""
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="is not an http"):
        GpuInferenceCheck(url="ftp://127.0.0.1/v1", model="m", prompt="hi")
    with pytest.raises(pydantic.ValidationError, match="expect_regex is not a valid regular expression"):
        GpuInferenceCheck(url="http://127.0.0.1:9/v1", model="m", prompt="hi", expect_regex="(")
    ok, msg, _ = gpu.gpu_inference(GpuInferenceCheck.model_construct(url="ftp://127.0.0.1/v1", model="m", prompt="hi", expect_regex=None,
                                                                     embedding_input=None, golden=None, min_similarity=0.99,
                                                                     latency_ms=None), ctx(tmp_path))
    assert not ok and "is not an http(s) URL" in msg


def test_embeddings_similar_vector_passes(stub, tmp_path):
    stub.embedding([0.1, 0.2, 0.3, 0.41])
    ok, msg, detail = gpu.gpu_inference(emb_spec(stub), ctx(tmp_path))
    assert ok, msg
    assert detail["similarity"] > 0.99 and detail["dimension"] == 4
    assert stub.requests[-1] == ("/v1/embeddings", {"model": "clip", "input": "a photo of a cat"})


def test_embeddings_dissimilar_vector_fails(stub, tmp_path):
    stub.embedding([0.4, 0.3, 0.2, 0.1])
    ok, msg, detail = gpu.gpu_inference(emb_spec(stub), ctx(tmp_path))
    assert not ok and "below 0.99" in msg
    assert math.isclose(detail["similarity"], 2.0 / 3.0, rel_tol=1e-4)


def test_embeddings_dimension_mismatch_fails(stub, tmp_path):
    stub.embedding([0.1, 0.2, 0.3])
    ok, msg, _ = gpu.gpu_inference(emb_spec(stub), ctx(tmp_path))
    assert not ok and "3 dimensions, the golden vector 4" in msg


# ----------------------------------------------------------------------------- transcode

@pytest.fixture(scope="module")
def ffmpeg():
    require("ffmpeg")
    return require("ffprobe")


@pytest.fixture(scope="module")
def sample(ffmpeg, tmp_path_factory) -> Path:
    """A real 2 s 320x240 25 fps H.264 file, moov atom first (so a truncated copy still opens)."""
    out = tmp_path_factory.mktemp("sample") / "sample.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=25", "-t", "2", "-c:v", "libx264", "-preset", "veryfast",
                    "-movflags", "+faststart", str(out)], check=True, timeout=60)
    return out


def test_software_transcode_of_generated_sample_passes_labelled_software(ffmpeg, tmp_path):
    sc = ctx(tmp_path)
    ok, msg, detail = gpu.transcode(TranscodeCheck(hwaccel="none", seconds=2), sc)
    assert ok, msg
    assert msg.startswith("software (no hardware acceleration)") and "libx264" in msg
    assert detail["software"] is True and detail["encoder"] == "libx264"
    assert detail["frames"] == detail["frames_expected"] == 60
    assert abs(detail["duration"] - 2) <= 0.1 and (detail["width"], detail["height"]) == (1280, 720)
    assert Path(detail["output"]).parent == sc.work and Path(detail["output"]).stat().st_size > 0


def test_software_transcode_of_a_restored_file(ffmpeg, sample, tmp_path):
    sc = ctx(tmp_path)
    (sc.target / "media").mkdir()
    (sc.target / "media" / "clip.mp4").write_bytes(sample.read_bytes())
    ok, msg, detail = gpu.transcode(TranscodeCheck(hwaccel="none", input="media/clip.mp4", seconds=2, codec="hevc"), sc)
    assert ok, msg
    assert detail["encoder"] == "libx265" and detail["output_codec"] == "hevc"
    assert detail["fps"] == 25 and detail["frames"] == 50  # the input's frame rate, not the generator's


@pytest.mark.parametrize("hwaccel", ["vaapi", "qsv"])
def test_hardware_transcode_without_render_node_fails_clearly(ffmpeg, tmp_path, hwaccel):
    spec = TranscodeCheck(hwaccel=hwaccel, seconds=1)
    if Path(spec.device).exists():
        missing("a host without a GPU render node", f"this host has {spec.device}: the no-GPU refusal cannot be shown here")
    ok, msg, detail = gpu.transcode(spec, ctx(tmp_path))
    assert not ok
    assert msg.startswith(f"no {hwaccel.upper()} device: /dev/dri/renderD128 does not exist")
    assert "ffmpeg: [AVHWDeviceContext] No VA display found for device /dev/dri/renderD128" in msg
    assert detail["software"] is False and "frames" not in detail


def test_unreadable_input_fails(ffmpeg, sample, tmp_path):
    sc = ctx(tmp_path)
    (sc.target / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 4000)  # a header and nothing
    ok, msg, _ = gpu.transcode(TranscodeCheck(hwaccel="none", input="clip.mp4", seconds=2), sc)
    assert not ok and "the input clip.mp4 is not a readable video" in msg


def test_truncated_input_fails_on_frame_count(ffmpeg, sample, tmp_path):
    # the moov atom survives the cut, so the container still claims 2 s and ffmpeg exits 0:
    # only counting the output's frames shows the loss
    sc = ctx(tmp_path)
    data = sample.read_bytes()
    (sc.target / "clip.mp4").write_bytes(data[: len(data) // 3])
    ok, msg, detail = gpu.transcode(TranscodeCheck(hwaccel="none", input="clip.mp4", seconds=2), sc)
    assert not ok and "libx264 output is wrong" in msg and "expected 50 ± 1" in msg
    assert detail["frames"] < 50


def test_missing_input_fails(ffmpeg, tmp_path):
    ok, msg, _ = gpu.transcode(TranscodeCheck(hwaccel="none", input="nope.mp4", seconds=1), ctx(tmp_path))
    assert not ok and "does not exist" in msg


def test_output_judgement():
    from fractions import Fraction

    assert gpu.judge_output({"frames": 61, "duration": 2.03}, 2, Fraction(30)) == []
    problems = gpu.judge_output({"frames": 50, "duration": 1.7}, 2, Fraction(30))
    assert problems == ["50 frames, expected 60 ± 1", "duration 1.700 s, expected 2 s ± 5%"]
