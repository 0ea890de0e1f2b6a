"""The accelerator checks a drill step runs: ``gpu_compute`` (a matmul on the GPU against a
CPU reference, and its TFLOP/s), ``gpu_inference`` (an OpenAI-compatible chat or embeddings
endpoint answers as before) and ``transcode`` (ffmpeg encodes with the hardware encoder).

Each is ``(spec, sc) -> (ok, message, detail)`` like the checks in checks.py and returns a
failure instead of raising. None of them ever passes without the hardware it is about: a
matmul that fell back to the CPU, or a transcode in software, says so in its message, and
only counts as a pass where the spec asked for the CPU (``device: cpu``) or for software
(``hwaccel: none``). torch is imported lazily (the ``gpu`` extra); ffmpeg and ffprobe run
through ``drtool.exec.run``.
"""
from __future__ import annotations

import http.client
import json
import math
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from .. import exec as ex
from ..errors import DrtoolError

Outcome = tuple[bool, str, dict[str, Any]]

TORCH_MISSING = "torch is not installed: pip install 'drtool[gpu]'"


# --------------------------------------------------------------------------- gpu-compute

@dataclass(frozen=True)
class Device:
    """Where the matmul runs: the torch device string, the backend that drives it and its name."""

    torch_device: str  # "cuda" (also ROCm/HIP builds), "xpu" or "cpu"
    backend: str  # "cuda", "hip", "xpu" or "cpu"
    name: str

    @property
    def is_gpu(self) -> bool:
        return self.backend != "cpu"


class DeviceUnavailable(Exception):
    """The device the spec asked for is not there (the message says why)."""


def _xpu_available(torch: Any) -> bool:
    xpu = getattr(torch, "xpu", None)
    try:
        return bool(xpu is not None and xpu.is_available())
    except Exception:  # an xpu module that cannot talk to its runtime: no xpu
        return False


def _cuda_available(torch: Any) -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _cuda_device(torch: Any) -> Device:
    backend = "hip" if getattr(torch.version, "hip", None) else "cuda"
    return Device("cuda", backend, str(torch.cuda.get_device_name(0)))


def _xpu_device(torch: Any) -> Device:
    return Device("xpu", "xpu", str(torch.xpu.get_device_name(0)))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def _build(torch: Any) -> str:
    hip, cuda = getattr(torch.version, "hip", None), getattr(torch.version, "cuda", None)
    kind = f"ROCm/HIP {hip}" if hip else f"CUDA {cuda}" if cuda else "CPU-only"
    return f"torch {torch.__version__} ({kind} build)"


def pick_device(torch: Any, want: str) -> Device:
    """The device for ``want`` (auto, cuda, rocm, xpu, cpu). auto: torch.cuda (CUDA or a
    ROCm/HIP build), else torch.xpu (Intel), else the CPU (a fallback the caller must label).
    An explicit GPU that is not there raises DeviceUnavailable."""
    if want == "cpu":
        return Device("cpu", "cpu", cpu_name())
    if want == "auto":
        if _cuda_available(torch):
            return _cuda_device(torch)
        if _xpu_available(torch):
            return _xpu_device(torch)
        return Device("cpu", "cpu", cpu_name())
    if want in ("cuda", "rocm"):
        is_hip = bool(getattr(torch.version, "hip", None))
        if want == "cuda" and is_hip:
            raise DeviceUnavailable(f"device cuda is not available: {_build(torch)} drives AMD GPUs (use device rocm)")
        if want == "rocm" and not is_hip:
            raise DeviceUnavailable(f"device rocm is not available: {_build(torch)} is not a ROCm/HIP build "
                                    "(install torch from the ROCm wheel index)")
        if not _cuda_available(torch):
            raise DeviceUnavailable(f"device {want} is not available: torch.cuda.is_available() is False with {_build(torch)}")
        return _cuda_device(torch)
    if want == "xpu":
        if not _xpu_available(torch):
            raise DeviceUnavailable(f"device xpu is not available: torch.xpu.is_available() is False with {_build(torch)}")
        return _xpu_device(torch)
    raise DeviceUnavailable(f"unknown device {want!r}")


def _sync(torch: Any, dev: Device) -> None:
    if dev.torch_device == "cuda":
        torch.cuda.synchronize()
    elif dev.torch_device == "xpu":
        torch.xpu.synchronize()


def _release(torch: Any, dev: Device) -> None:
    """Hand the cached device memory back: the next check (a model server) may need it."""
    try:
        if dev.torch_device == "cuda":
            torch.cuda.empty_cache()
        elif dev.torch_device == "xpu":
            torch.xpu.empty_cache()
    except Exception:  # best effort
        pass


FALLBACK_MAX_N = 2048  # the CPU fallback runs at most this size, in float32: CPU half-precision matmul is ~100× slower
REF_SAMPLE = 256  # rows and columns of the product checked against the float64 reference
MIN_TIMED_S = 0.2  # repeat the timed matmul until this much time is measured (few repeats on slow devices)


def measure_matmul(torch: Any, dev: Device, n: int, dtype: str) -> dict[str, float]:
    """An n×n @ n×n matmul in ``dtype`` on ``dev``: a warm-up, then timed with the device
    synchronized, then a REF_SAMPLE×REF_SAMPLE block of the product compared with a CPU
    float64 product of the same (already rounded to ``dtype``) inputs. Memory: the three
    matrices on the device, and only the sampled rows and columns on the host.
    rel_error is max|C - ref| / max|ref| over the block."""
    tdtype = getattr(torch, dtype)
    gen = torch.Generator(device=dev.torch_device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=dev.torch_device, dtype=torch.float32).to(tdtype)
    b = torch.randn(n, n, generator=gen, device=dev.torch_device, dtype=torch.float32).to(tdtype)
    if dev.is_gpu:
        c = a @ b  # warm-up at the real shape: kernel selection, library handles
        _sync(torch, dev)
    else:  # the CPU needs no per-shape warm-up, and a full-size one would double a slow run
        small = a[:64, :64]
        small @ small
    reps, elapsed = 0, 0.0
    while elapsed < MIN_TIMED_S and reps < 50:
        step = 1 if reps == 0 else max(1, min(50 - reps, math.ceil((MIN_TIMED_S - elapsed) / (elapsed / reps))))
        t0 = time.perf_counter()
        for _ in range(step):
            c = a @ b
        _sync(torch, dev)
        elapsed += time.perf_counter() - t0
        reps += step
    seconds = elapsed / reps
    k = min(n, REF_SAMPLE)
    pick = torch.Generator().manual_seed(1)
    rows = torch.randperm(n, generator=pick)[:k]
    cols = torch.randperm(n, generator=pick)[:k]
    ref = a[rows.to(a.device)].cpu().double() @ b[:, cols.to(b.device)].cpu().double()
    got = c[rows.to(c.device)][:, cols.to(c.device)].cpu().double()
    scale = ref.abs().max().item() or 1.0
    rel_error = (got - ref).abs().max().item() / scale
    return {"seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12, "rel_error": rel_error, "repeats": reps}


def gpu_compute(spec: Any, sc: Any) -> Outcome:
    try:
        import torch
    except ImportError:
        return False, TORCH_MISSING, {}
    except OSError as exc:  # a broken install (a missing shared library)
        return False, f"torch failed to import: {exc}", {}
    try:
        dev = pick_device(torch, spec.device)
    except DeviceUnavailable as exc:
        return False, str(exc), {"device": spec.device, "backend": None, "torch": torch.__version__}
    n, dtype = spec.size, spec.dtype
    if not dev.is_gpu and spec.device != "cpu":  # the fallback only shows the math runs: keep it short
        n, dtype = min(n, FALLBACK_MAX_N), "float32"
    detail: dict[str, Any] = {"device": dev.name, "backend": dev.backend, "torch": torch.__version__, "size": n, "dtype": dtype}
    try:
        m = measure_matmul(torch, dev, n, dtype)
    except (RuntimeError, TypeError) as exc:  # out of memory, a driver error, a dtype the device lacks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"{n}×{n} {dtype} matmul on {dev.backend} ({dev.name}) failed: {first}", detail
    finally:
        _release(torch, dev)
    detail.update(tflops=round(m["tflops"], 4), rel_error=m["rel_error"], seconds=round(m["seconds"], 6), repeats=m["repeats"])
    return judge_compute(spec, dev, m, detail, build=_build(torch))


def judge_compute(spec: Any, dev: Device, m: dict[str, float], detail: dict[str, Any], build: str = "torch") -> Outcome:
    """The verdict on a measured matmul (``detail`` says which size and dtype ran). A CPU run
    is never a GPU pass: it only passes when the spec asked for the CPU."""
    n, dtype = detail.get("size", spec.size), detail.get("dtype", spec.dtype)
    correct = m["rel_error"] <= spec.tolerance
    problems = []
    if not correct:
        problems.append(f"result WRONG: relative error {m['rel_error']:.3g} > tolerance {spec.tolerance:g}")
    if spec.min_tflops is not None and m["tflops"] < spec.min_tflops:
        problems.append(f"{m['tflops']:.3g} TFLOP/s is below the floor of {spec.min_tflops:g} TFLOP/s")
    what = f"{n}×{n} {dtype} matmul at {m['tflops']:.3g} TFLOP/s, relative error {m['rel_error']:.2g}"
    if not dev.is_gpu and spec.device != "cpu":
        state = "result correct" if correct else f"result WRONG: relative error {m['rel_error']:.3g} > {spec.tolerance:g}"
        return False, (f"no GPU: ran on the CPU fallback ({n}×{n} {dtype}: {m['tflops']:.3g} TFLOP/s, {state}) — not a GPU "
                       f"pass (no CUDA, ROCm or XPU device visible to {build})"), detail
    label = f"CPU ({dev.name})" if not dev.is_gpu else f"{dev.name} ({dev.backend})"
    if problems:
        return False, f"{label}: " + "; ".join(problems) + f" ({what})", detail
    floor = f", above the {spec.min_tflops:g} TFLOP/s floor" if spec.min_tflops is not None else ""
    return True, f"{label}: {what} (≤ {spec.tolerance:g}){floor}", detail


# ------------------------------------------------------------------------- gpu-inference

INFERENCE_TIMEOUT_S = 120.0  # a cold model load (Ollama pulling weights into VRAM) can take a while


def _timeout(spec: Any) -> float:
    if spec.latency_ms is None:
        return INFERENCE_TIMEOUT_S
    return min(INFERENCE_TIMEOUT_S, spec.latency_ms / 1000 * 2 + 5)


def post_json(url: str, body: dict[str, Any], timeout: float) -> tuple[int, bytes, float]:
    """POST ``body`` as JSON; (status, response body, milliseconds). Raises OSError
    (unreachable, timed out) and ValueError (not an http URL)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, data = resp.status, resp.read(16 << 20)
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read(1 << 16) if exc.fp else b""
    return status, data, round((time.monotonic() - t0) * 1000, 1)


def _error_text(data: bytes) -> str:
    """The server's own error message when it sent one (OpenAI shape: {"error": {"message"}})."""
    try:
        doc = json.loads(data)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except ValueError:
        pass
    text = data.decode(errors="replace").strip()
    return text[:200] + ("…" if len(text) > 200 else "") or "empty body"


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return 0.0
    return dot / (na * nb)


def _chat_answer(doc: Any) -> str:
    try:
        content = doc["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content in the response") from None
    if not isinstance(content, str):
        raise ValueError("choices[0].message.content is not a string")
    return content


def _embedding(doc: Any) -> list[float]:
    try:
        vec = doc["data"][0]["embedding"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no data[0].embedding in the response") from None
    if not isinstance(vec, list) or not vec or not all(isinstance(x, (int, float)) for x in vec):
        raise ValueError("data[0].embedding is not a list of numbers")
    return [float(x) for x in vec]


def gpu_inference(spec: Any, sc: Any) -> Outcome:
    chat = spec.prompt is not None
    if not re.match(r"^https?://[^/\s]+", spec.url):
        return False, f"url {spec.url!r} is not an http(s) URL", {"url": spec.url}
    if chat and spec.expect_regex:
        try:
            re.compile(spec.expect_regex)
        except re.error as exc:
            return False, f"expect_regex is not a valid regular expression: {exc}", {"url": spec.url}
    if chat:
        url = spec.url.rstrip("/") + "/chat/completions"
        body: dict[str, Any] = {"model": spec.model, "messages": [{"role": "user", "content": spec.prompt}],
                                "temperature": 0, "seed": 0, "stream": False}
    else:
        url = spec.url.rstrip("/") + "/embeddings"
        body = {"model": spec.model, "input": spec.embedding_input}
    timeout = _timeout(spec)
    detail: dict[str, Any] = {"url": url, "model": spec.model, "mode": "chat" if chat else "embeddings"}
    try:
        status, data, ms = post_json(url, body, timeout)
    except http.client.HTTPException as exc:  # a garbled or cut-off HTTP answer
        return False, f"POST {url}: a broken HTTP response ({type(exc).__name__}: {exc})", detail
    except OSError as exc:  # unreachable, refused, timed out (TimeoutError is an OSError)
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return False, f"POST {url}: no answer within {timeout:g} s (timed out)", detail
        return False, f"POST {url} failed: {reason}", detail
    except ValueError as exc:  # a URL urllib cannot parse
        return False, f"POST {url}: {exc}", detail
    detail.update(status=status, latency_ms=ms)
    if status != 200:
        return False, f"POST {url}: HTTP {status}: {_error_text(data)}", detail
    try:
        doc = json.loads(data)
        result = _chat_answer(doc) if chat else _embedding(doc)
    except ValueError as exc:
        return False, f"POST {url}: HTTP 200 but {exc if not isinstance(exc, json.JSONDecodeError) else 'the body is not JSON'}", detail
    problems = []
    if chat:
        detail["answer"] = result[:500]
        if spec.expect_regex:
            if not re.search(spec.expect_regex, result):
                short = result.strip().replace("\n", " ")
                problems.append(f"the answer {short[:120]!r} does not match /{spec.expect_regex}/")
    else:
        golden = list(spec.golden)
        detail["dimension"] = len(result)
        if len(result) != len(golden):
            problems.append(f"the embedding has {len(result)} dimensions, the golden vector {len(golden)} (a different model?)")
        else:
            sim = cosine(result, golden)
            detail["similarity"] = round(sim, 6)
            if sim < spec.min_similarity:
                problems.append(f"cosine similarity {sim:.4f} to the golden vector is below {spec.min_similarity:g}")
    if spec.latency_ms is not None and ms > spec.latency_ms:
        problems.append(f"{ms} ms, over the {spec.latency_ms} ms budget")
    what = f"{spec.model} at {spec.url}"
    if problems:
        return False, f"{what}: " + "; ".join(problems), detail
    got = (f"answered {result.strip()[:60]!r}" if chat else f"embedding similarity {detail['similarity']:.4f}")
    return True, f"{what}: {got} in {ms} ms", detail


# ----------------------------------------------------------------------------- transcode

ENCODERS = {
    "vaapi": {"h264": ["h264_vaapi"], "hevc": ["hevc_vaapi"], "av1": ["av1_vaapi"]},
    "qsv": {"h264": ["h264_qsv"], "hevc": ["hevc_qsv"], "av1": ["av1_qsv"]},
    "none": {"h264": ["libx264"], "hevc": ["libx265"], "av1": ["libsvtav1", "libaom-av1"]},
}
# fast presets: the check proves the encoder works, not its best quality
SPEED_OPTS = {"libx264": ["-preset", "veryfast"], "libx265": ["-preset", "ultrafast"], "libsvtav1": ["-preset", "12"],
              "libaom-av1": ["-cpu-used", "8", "-row-mt", "1"]}
GENERATED = "testsrc2=size=1280x720:rate=30"
GENERATED_FPS = Fraction(30)
DURATION_SLACK = 0.05  # the output's duration may differ from the expected seconds by this fraction
HW_FAILURE = re.compile(r"Device creation failed|No VA display|Failed to initiali[sz]e|init_hw_device|"
                        r"Error creating a MFX session|No device available for (?:de|en)coder|Device setup failed|"
                        r"hwupload|Failed to (?:create|open) .*(?:VAAPI|vaapi|QSV|qsv)|vaInitialize", re.I)
LABELS = {"vaapi": "VAAPI", "qsv": "Quick Sync (QSV)", "none": "software (no hardware acceleration)"}


def available_encoders(timeout: float = 30) -> set[str]:
    res = ex.run(["ffmpeg", "-hide_banner", "-nostdin", "-encoders"], timeout=timeout, check=False)
    names = set()
    for line in (res.stdout or "").splitlines():
        m = re.match(r"^\s*[VAS][A-Z.]{5}\s+(\S+)", line)
        if m:
            names.add(m.group(1))
    return names


def pick_encoder(hwaccel: str, codec: str, available: set[str]) -> str | None:
    return next((e for e in ENCODERS[hwaccel][codec] if e in available), None)


def transcode_argv(hwaccel: str, device: str, source: Path | None, seconds: float, encoder: str, out: Path) -> list[str]:
    """The ffmpeg command: a generated test pattern (source None) or a file, ``seconds`` of
    it, encoded with ``encoder``; hardware frames are uploaded to ``device``."""
    argv = ["ffmpeg", "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y"]
    vf: str | None = None
    if hwaccel == "vaapi":
        argv += ["-init_hw_device", f"vaapi=va:{device}", "-filter_hw_device", "va"]
        if source is not None:  # decode on the device too when it can (else software frames are uploaded)
            argv += ["-hwaccel", "vaapi", "-hwaccel_device", "va", "-hwaccel_output_format", "vaapi"]
            vf = "format=nv12|vaapi,hwupload"
        else:
            vf = "format=nv12,hwupload"
    elif hwaccel == "qsv":
        argv += ["-init_hw_device", f"vaapi=va:{device}", "-init_hw_device", "qsv=qs@va", "-filter_hw_device", "qs"]
        vf = "format=nv12,hwupload=extra_hw_frames=64,format=qsv"
    argv += ["-f", "lavfi", "-i", GENERATED] if source is None else ["-i", str(source)]
    argv += ["-t", f"{seconds:g}", "-map", "0:v:0", "-an", "-sn", "-dn"]
    if vf:
        argv += ["-vf", vf]
    argv += ["-c:v", encoder, *SPEED_OPTS.get(encoder, []), str(out)]
    return argv


def probe(path: Path, count_frames: bool, timeout: float) -> dict[str, Any]:
    """ffprobe's view of the first video stream: codec, size, frame rate, duration, and
    (count_frames: every frame decoded) the frame count. Raises CommandError on an
    unreadable file."""
    argv = ["ffprobe", "-v", "error", "-select_streams", "v:0",
            "-show_entries", "stream=codec_name,width,height,avg_frame_rate,r_frame_rate,nb_read_frames,duration"
            ":format=duration", "-of", "json", str(path)]
    if count_frames:
        argv.insert(1, "-count_frames")
    doc = ex.run(argv, timeout=timeout, parse="json").parsed or {}
    streams = doc.get("streams") or []
    if not streams:
        raise DrtoolError(f"{path.name} has no video stream")
    s = streams[0]
    duration = (doc.get("format") or {}).get("duration") or s.get("duration")
    frames = s.get("nb_read_frames")
    return {"codec": s.get("codec_name"), "width": s.get("width"), "height": s.get("height"),
            "fps": _rate(s.get("avg_frame_rate")) or _rate(s.get("r_frame_rate")),
            "duration": float(duration) if duration not in (None, "N/A") else None,
            "frames": int(frames) if frames not in (None, "N/A") else None}


def _rate(text: str | None) -> Fraction | None:
    try:
        r = Fraction(text) if text else None
    except (ValueError, ZeroDivisionError):
        return None
    return r if r else None


def judge_output(out: dict[str, Any], seconds: float, fps: Fraction) -> list[str]:
    """What is wrong with the transcoded output: its duration must be within 5 % of
    ``seconds`` and its frame count round(seconds × fps) ± 1."""
    problems = []
    want_frames = round(seconds * fps)
    if out["frames"] is None:
        problems.append("ffprobe could not count its frames")
    elif abs(out["frames"] - want_frames) > 1:
        problems.append(f"{out['frames']} frames, expected {want_frames} ± 1")
    if out["duration"] is None:
        problems.append("it has no duration")
    elif abs(out["duration"] - seconds) > DURATION_SLACK * seconds:
        problems.append(f"duration {out['duration']:.3f} s, expected {seconds:g} s ± {DURATION_SLACK:.0%}")
    return problems


def ffmpeg_tail(res: Any, n: int) -> str:
    """The last n non-empty stderr lines on one line, without ffmpeg's '@ 0x…' context addresses."""
    return re.sub(r" @ 0x[0-9a-f]+", "", res.stderr_tail(n)).replace("\n", " | ")


def _hw_failure(hwaccel: str, device: str, tail: str) -> str:
    name = LABELS[hwaccel]
    if not Path(device).exists():
        return f"no {hwaccel.upper()} device: {device} does not exist (no GPU render node on this host): ffmpeg: {tail}"
    return f"the {name} device {device} could not be initialised: ffmpeg: {tail}"


def _resolve_input(spec: Any, sc: Any) -> Path | None:
    if spec.input is None:
        return None
    p = Path(spec.input)
    return p if p.is_absolute() else Path(sc.target) / p


def transcode(spec: Any, sc: Any) -> Outcome:
    label = LABELS[spec.hwaccel]
    detail: dict[str, Any] = {"hwaccel": spec.hwaccel, "software": spec.hwaccel == "none", "codec": spec.codec,
                              "seconds_expected": spec.seconds}
    if spec.hwaccel != "none":
        detail["device"] = spec.device
    try:
        return _transcode(spec, sc, label, detail)
    except DrtoolError as exc:  # ffmpeg/ffprobe missing, timed out, or failed to read
        return False, f"{label}: {exc}", detail


def _transcode(spec: Any, sc: Any, label: str, detail: dict[str, Any]) -> Outcome:
    encoder = pick_encoder(spec.hwaccel, spec.codec, available_encoders())
    if encoder is None:
        wanted = " or ".join(ENCODERS[spec.hwaccel][spec.codec])
        return False, f"{label}: this ffmpeg has no {wanted} encoder (a build or version without it)", detail
    detail["encoder"] = encoder
    source = _resolve_input(spec, sc)
    fps = GENERATED_FPS
    if source is not None:
        detail["input"] = str(source)
        if not source.is_file():
            return False, f"{label}: the input {source} does not exist", detail
        try:
            src = probe(source, count_frames=False, timeout=60)
        except ex.CommandError as exc:
            return False, f"{label}: the input {source.name} is not a readable video: {ffmpeg_tail(exc.result, 2) or exc}", detail
        if src["fps"] is None:
            return False, f"{label}: the input {source.name} has no frame rate ffprobe can read", detail
        fps = src["fps"]
        if src["duration"] is not None and src["duration"] < spec.seconds * (1 - DURATION_SLACK):
            return False, f"{label}: the input {source.name} is {src['duration']:.3f} s long, shorter than the {spec.seconds:g} s to transcode", detail
    out = Path(sc.work) / f"transcode-{spec.hwaccel}-{spec.codec}.mp4"
    argv = transcode_argv(spec.hwaccel, spec.device, source, spec.seconds, encoder, out)
    t0 = time.monotonic()
    res = ex.run(argv, timeout=120 + spec.seconds * 20, check=False)
    elapsed = time.monotonic() - t0
    detail["elapsed_s"] = round(elapsed, 3)
    if res.returncode != 0:
        tail = ffmpeg_tail(res, 3) or f"exit {res.returncode}"
        if spec.hwaccel != "none" and HW_FAILURE.search("\n".join(res.stderr_lines)):
            return False, _hw_failure(spec.hwaccel, spec.device, ffmpeg_tail(res, 4)), detail
        return False, f"{label}: ffmpeg ({encoder}) failed: {tail}", detail
    try:
        got = probe(out, count_frames=True, timeout=60 + spec.seconds * 5)
    except ex.CommandError as exc:
        return False, f"{label}: the output of {encoder} is not readable: {ffmpeg_tail(exc.result, 2) or exc}", detail
    want_frames = round(spec.seconds * fps)
    detail.update(output=str(out), frames=got["frames"], frames_expected=want_frames, duration=got["duration"],
                  fps=float(fps), width=got["width"], height=got["height"], output_codec=got["codec"],
                  speed=round(spec.seconds / elapsed, 2) if elapsed > 0 else None)
    problems = judge_output(got, spec.seconds, fps)
    if problems:
        return False, f"{label}: {encoder} output is wrong: " + "; ".join(problems), detail
    where = f" on {spec.device}" if spec.hwaccel != "none" else ""
    return True, (f"{label}{where}: {encoder} encoded {spec.seconds:g} s of {got['width']}x{got['height']} at "
                  f"{float(fps):g} fps: {got['frames']} frames, {got['duration']:.3f} s ({detail['speed']}× realtime)"), detail
