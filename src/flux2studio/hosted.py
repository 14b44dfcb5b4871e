"""The closed FLUX models (FLUX.2 pro / max / flex, FLUX.1 Kontext pro / max, and hosted klein) through
Black Forest Labs' API, behind the same call as a local `Pipeline`.

The API is asynchronous: POST the request to the model's endpoint, then GET the `polling_url` it returns
(used as given, never rebuilt: the global endpoint routes tasks across clusters) until the status is
`Ready`, then download `result.sample` at once (signed URLs expire after ten minutes). The key travels in
the `x-key` header only to the API's own hosts; it never appears in errors, logs, metadata or job stores.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from . import __version__
from .images import MULTIPLE, as_seen, image_hash, parameters_text, size_for_aspect
from .pipeline import opened_settings, whole, with_seeds_counted
from .settings import GenerationSettings
from .variants import ASPECTS, Variant, get_variant

REGIONS = {"global": "https://api.bfl.ai", "eu": "https://api.eu.bfl.ai", "us": "https://api.us.bfl.ai"}
API_HOSTS = ("bfl.ai", "bfl.ml")  # the key is sent to these hosts (and to the configured base URL) only
MAX_PIXELS = 4 * 1024 * 1024  # "up to 4 MP"
MODERATED = ("Request Moderated", "Content Moderated")  # BFL's statuses for a refused input / output
MIN_SIDE = 64
SAFETY_DEFAULT = 2
OUTPUT_FORMATS = ("png", "jpeg")


@dataclass(frozen=True)
class Endpoint:
    """What one hosted model accepts, and its price (USD; FLUX.2 bills per megapixel, inputs included)."""

    model: str
    path: str
    family: Literal["flux2", "kontext"]
    max_refs: int
    safety_max: int
    first_mp: float  # price of the first megapixel (or of the image, for Kontext)
    extra_mp: float = 0.0  # each further megapixel, output and reference images
    steps: tuple[int, int, int] | None = None  # (min, max, default) where the endpoint takes steps
    guidance: tuple[float, float, float] | None = None
    prompt_upsampling: bool = False


ENDPOINTS: dict[str, Endpoint] = {
    e.model: e
    for e in (
        Endpoint("pro", "/v1/flux-2-pro", "flux2", 8, 5, 0.03, 0.015),
        Endpoint("max", "/v1/flux-2-max", "flux2", 8, 5, 0.07, 0.03),
        Endpoint("flex", "/v1/flux-2-flex", "flux2", 8, 5, 0.05, 0.05, (1, 50, 50), (1.5, 10.0, 4.5), True),
        Endpoint("kontext-pro", "/v1/flux-kontext-pro", "kontext", 1, 6, 0.04, prompt_upsampling=True),
        Endpoint("kontext-max", "/v1/flux-kontext-max", "kontext", 1, 6, 0.08, prompt_upsampling=True),
        Endpoint("klein-4b", "/v1/flux-2-klein-4b", "flux2", 4, 5, 0.014, 0.001),
        Endpoint("klein-9b", "/v1/flux-2-klein-9b", "flux2", 4, 5, 0.015, 0.002),
    )
}


def endpoint(model_id: str) -> Endpoint:
    """The hosted endpoint of `model_id` (hosted models, and klein through `--backend api`); an error naming them."""
    if model_id not in ENDPOINTS:
        raise ValueError(f"{model_id} has no hosted endpoint; hosted: {', '.join(ENDPOINTS)}")
    return ENDPOINTS[model_id]


class HostedError(RuntimeError):
    """A failure of the hosted API, said so that the user knows what to do. `charged` is False when BFL
    does not bill the failed task (moderation), None when unknown."""

    def __init__(self, message: str, status: int | None = None, charged: bool | None = None) -> None:
        super().__init__(message)
        self.status, self.charged = status, charged
        self.partial: dict = {}  # {index: (image, task, result)} made before the failure
        self.images: list = []  # [(index, image with metadata)], set by HostedPipeline


def key_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "flux2studio" / "bfl_api_key"


def find_key(env: dict[str, str] | None = None) -> str | None:
    """`BFL_API_KEY`, else the key file (which must be readable by its owner only); None when neither."""
    env = os.environ if env is None else env
    if env.get("BFL_API_KEY", "").strip():
        return env["BFL_API_KEY"].strip()
    path = key_file()
    if not path.is_file():
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise HostedError(f"{path} holds a secret but has permissions {mode:o}: run `chmod 600 {path}`")
    return path.read_text().strip() or None


def required_key() -> str:
    """The configured key, or an error saying how to configure one."""
    key = find_key()
    if not key:
        raise HostedError(
            "no Black Forest Labs API key: set BFL_API_KEY, or write the key to "
            f"{key_file()} (chmod 600); keys are made at https://dashboard.bfl.ai"
        )
    return key


def key_present() -> bool:
    """Whether a usable key is configured (a key file with loose permissions counts as none)."""
    try:
        return find_key() is not None
    except HostedError:
        return False


def base_url(region_or_url: str | None = None) -> str:
    """`global` (default), `eu`, `us`, or a full URL (`BFL_API_URL` when not given)."""
    value = region_or_url or os.environ.get("BFL_API_URL") or "global"
    if value in REGIONS:
        return REGIONS[value]
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"BFL API location {value!r} is not one of {', '.join(REGIONS)} or an http(s) URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"refusing to send the API key over plain http to {parts.hostname}: use https")
    return value.rstrip("/")


def price(endpoint: Endpoint, width: int, height: int, ref_pixels: Sequence[int] = ()) -> float:
    """Estimated USD for one image (BFL reports the real cost with each task)."""
    if endpoint.family == "kontext":
        return endpoint.first_mp
    mp = math.ceil(width * height / 2**20) + sum(math.ceil(p / 2**20) for p in ref_pixels)  # 1 MP = 1024x1024
    return round(endpoint.first_mp + endpoint.extra_mp * max(0, mp - 1), 4)


def kontext_aspect(width: int, height: int) -> str:
    """Kontext takes an aspect ratio, not a size: "1024x768" -> "4:3", kept within 21:9 .. 9:21."""
    g = math.gcd(width, height)
    a, b = width // g, height // g
    if not 9 / 21 <= a / b <= 21 / 9:
        raise ValueError(f"{width}x{height} is outside Kontext's aspect-ratio range 21:9 .. 9:21")
    return f"{a}:{b}"


@dataclass(frozen=True)
class HostedRequest:
    prompt: str
    width: int
    height: int
    seed: int
    steps: int | None
    guidance: float | None
    aspect: str | None  # Kontext only


def check_request(
    endpoint: Endpoint, settings: GenerationSettings, ref_sizes: Sequence[tuple[int, int]] = ()
) -> tuple[GenerationSettings, str | None]:
    """The settings with size, steps and guidance resolved after every check (errors name value and range), and
    Kontext's aspect ratio. `ref_sizes`: (width, height) of each reference (the first sets the size when none is
    given). Editing a start image and a guidance interval are refused: they run on local models."""
    name = endpoint.model
    edit = {k: getattr(settings, k) for k in ("image", "mask", "strength", "expand")}
    if given := [k for k, v in {**edit, "mask_blur": settings.mask_blur}.items() if v is not None and v != 0]:
        raise ValueError(f"{name} is a hosted model: {', '.join(given)} (editing a start image) runs on "
                         "local models only; reference images (refs) work here")  # fmt: skip
    if settings.guidance_interval is not None:
        raise ValueError(f"{name} is a hosted model: the API sets its own guidance, no interval")
    if settings.prompt_upsampling and not endpoint.prompt_upsampling:  # (off: what it does anyway)
        upsampling = ", ".join(e.model for e in ENDPOINTS.values() if e.prompt_upsampling)
        raise ValueError(f"{name} (hosted) has no prompt upsampling: omit it ({upsampling} take it)")
    size, aspect, steps, guidance = settings.size, settings.aspect, settings.steps, settings.guidance
    if settings.negative_prompt:
        raise ValueError(f"{name} (hosted) takes no negative prompt: omit it")
    if endpoint.steps is None and steps is not None:
        raise ValueError(f"{name} (hosted) has a fixed number of steps: omit steps (flex takes 1..50)")
    if endpoint.guidance is None and guidance is not None:
        raise ValueError(f"{name} (hosted) takes no guidance: omit it (flex takes 1.5..10)")
    if endpoint.steps is not None:
        lo, hi, default = endpoint.steps
        steps = default if steps is None else steps
        if not isinstance(steps, int) or not lo <= steps <= hi:
            raise ValueError(f"steps {steps!r} is out of range {lo}..{hi} for {name}")
    if endpoint.guidance is not None:
        lo, hi, default = endpoint.guidance
        guidance = default if guidance is None else float(guidance)
        if not lo <= guidance <= hi:
            raise ValueError(f"guidance {guidance} is out of range {lo}..{hi} for {name}")
    if len(ref_sizes) > endpoint.max_refs:
        raise ValueError(f"{len(ref_sizes)} reference images given; {name} takes 0..{endpoint.max_refs}")
    if size is not None and aspect is not None:
        raise ValueError("give size or aspect, not both")
    if aspect is not None:
        size = size_for_aspect(aspect, 1024 * 1024)
    if size is None:  # the first reference's (Kontext: its aspect ratio), within the API's pixel limit
        w, h = ref_sizes[0] if ref_sizes else (1024, 1024)
        if w * h > MAX_PIXELS:
            scale = math.sqrt(MAX_PIXELS / (w * h))
            w, h = int(w * scale), int(h * scale)
        size = (w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE)
    width, height = size
    for side, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value % MULTIPLE or value < MIN_SIDE:
            raise ValueError(f"{side} {value!r} must be a multiple of {MULTIPLE}, at least {MIN_SIDE}")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} is {width * height / 2**20:.1f} MP; {name} takes up to 4 MP")
    kontext = None
    if endpoint.family == "kontext":
        kontext = aspect or kontext_aspect(width, height)
    return settings.replace(size=(width, height), aspect=None, steps=steps, guidance=guidance), kontext


def encode_image(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def payload(
    endpoint: Endpoint,
    req: HostedRequest,
    refs: Sequence[str],
    *,
    safety_tolerance: int,
    output_format: str,
    prompt_upsampling: bool | None,
) -> dict[str, Any]:
    """The JSON body for one image: references as `input_image`, `input_image_2`, ... (base64)."""
    body: dict[str, Any] = {"prompt": req.prompt, "seed": req.seed, "safety_tolerance": safety_tolerance,
                            "output_format": output_format}  # fmt: skip
    if endpoint.family == "kontext":
        body["aspect_ratio"] = req.aspect
    else:
        body["width"], body["height"] = req.width, req.height
    for i, ref in enumerate(refs):
        body["input_image" if i == 0 else f"input_image_{i + 1}"] = ref
    if endpoint.steps is not None:
        body["steps"] = req.steps
    if endpoint.guidance is not None:
        body["guidance"] = req.guidance
    if prompt_upsampling is not None and endpoint.prompt_upsampling:
        body["prompt_upsampling"] = prompt_upsampling
    return body


class BflClient:
    """HTTP client for the BFL API: submit, poll, download, with bounded retries and backoff."""

    def __init__(
        self,
        key: str | None = None,
        location: str | None = None,
        *,
        timeout: float = 30.0,
        max_wait: float = 600.0,
        poll_interval: float = 0.5,
        max_poll_interval: float = 5.0,
        retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._key = key or required_key()
        self.base = base_url(location)
        self.max_wait, self.poll_interval, self.max_poll_interval = max_wait, poll_interval, max_poll_interval
        self.retries, self.sleep = retries, sleep
        self._http = httpx.Client(timeout=timeout, transport=transport, follow_redirects=False)

    def __repr__(self) -> str:  # never the key
        return f"BflClient({self.base!r})"

    def close(self) -> None:
        self._http.close()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***")

    def _keyed(self, url: str) -> bool:
        """Whether `url` is the API itself (gets the key) rather than, say, a delivery host."""
        host = urlsplit(url).hostname or ""
        return host == urlsplit(self.base).hostname or any(host == h or host.endswith("." + h) for h in API_HOSTS)

    def _request(self, method: str, url: str, what: str, **kw: Any) -> httpx.Response:
        """One call with bounded retries on 429 / 5xx / network errors (Retry-After honoured)."""
        headers = {"accept": "application/json"} | ({"x-key": self._key} if self._keyed(url) else {})
        delay, status = 1.0, None
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, url, headers=headers, **kw)
            except httpx.TimeoutException:
                problem = f"{what}: no answer from {urlsplit(url).hostname} in time"
            except httpx.HTTPError as e:
                problem = self._redact(f"{what}: cannot reach {urlsplit(url).hostname}: {e}")
            else:
                if r.status_code != 429 and r.status_code < 500:
                    return r
                status = r.status_code
                if r.status_code == 429:
                    problem = (f"{what}: too many active tasks on this account (HTTP 429) after {self.retries} "
                               "retries: wait for running tasks to finish, then retry")  # fmt: skip
                else:
                    problem = f"{what}: the BFL API failed (HTTP {r.status_code}) after {self.retries} retries"
                retry_after = r.headers.get("retry-after", "")
                if retry_after.isdigit():
                    delay = max(delay, float(retry_after))
            if attempt == self.retries:
                raise HostedError(problem, status)
            self.sleep(min(delay, 30.0) * (1 + 0.1 * random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    def _check(self, r: httpx.Response, what: str) -> dict:
        if r.status_code in (401, 403):
            raise HostedError(
                f"{what}: the BFL API refused the key (HTTP {r.status_code}): check BFL_API_KEY "
                "(a key of the right region and environment, not revoked)",
                r.status_code,
            )
        if r.status_code == 402:
            raise HostedError(f"{what}: out of credits (HTTP 402): add credits at https://dashboard.bfl.ai", 402)
        if r.status_code == 422:
            raise HostedError(f"{what}: the BFL API rejected the request (HTTP 422): {self._fields(r)}", 422)
        if r.status_code >= 400:
            raise HostedError(f"{what}: the BFL API answered HTTP {r.status_code}: {self._detail(r)}", r.status_code)
        try:
            return r.json()
        except ValueError:
            raise HostedError(f"{what}: the BFL API answered something that is not JSON", r.status_code) from None

    def _detail(self, r: httpx.Response) -> str:
        try:
            detail = r.json().get("detail", r.text)
        except (ValueError, AttributeError):
            detail = r.text
        return self._redact(str(detail)[:300])

    def _fields(self, r: httpx.Response) -> str:
        """FastAPI-style validation errors -> "field 'width': msg; ..." naming each bad field."""
        try:
            detail = r.json().get("detail")
        except (ValueError, AttributeError):
            detail = None
        if isinstance(detail, list):
            parts = []
            for item in detail:
                loc = [str(x) for x in item.get("loc", []) if x != "body"]
                parts.append(f"field {'.'.join(loc) or '?'!r}: {item.get('msg', 'invalid')}")
            return self._redact("; ".join(parts))
        return self._detail(r)

    def submit(self, endpoint: Endpoint, body: dict) -> dict:
        """POST a task; returns {"id", "polling_url", "cost"?, ...}."""
        r = self._request("POST", self.base + endpoint.path, f"{endpoint.model} submit", json=body)
        task = self._check(r, f"{endpoint.model} submit")
        if not task.get("id") or not task.get("polling_url"):
            raise HostedError(f"{endpoint.model} submit: the answer has no task id or polling_url")
        return task

    def poll(self, task: dict) -> dict | None:
        """One status check: the result dict when Ready, None while pending; errors raise."""
        tid = task["id"]
        r = self._request("GET", task["polling_url"], f"task {tid}")
        if r.status_code == 404:
            raise HostedError(f"task {tid} not found (unknown or expired)", 404)
        data = self._check(r, f"task {tid}")
        status = data.get("status")
        if status == "Ready":
            return data
        if status in ("Pending", "Queued", "Processing", None):
            task["progress"] = data.get("progress")
            return None
        if status == MODERATED[0]:
            raise HostedError(
                f"task {tid}: the prompt or a reference image was moderated before generation "
                "(Request Moderated); you were not charged. Change the input.",
                charged=False,
            )
        if status == MODERATED[1]:
            raise HostedError(
                f"task {tid}: the generated image was moderated (Content Moderated); you were not charged. "
                "Rephrase the prompt (or raise safety_tolerance where that is appropriate).",
                charged=False,
            )
        if status == "Task not found":
            raise HostedError(f"task {tid} not found (unknown or expired)")
        details = self._redact(json.dumps(data.get("details") or data.get("result") or {})[:300])
        raise HostedError(f"task {tid} failed on the BFL side ({status}): {details}")

    def download(self, url: str, tid: str) -> Image.Image:
        r = self._request("GET", url, f"task {tid} download")
        if r.status_code in (400, 403, 404, 410):
            raise HostedError(
                f"task {tid}: the result URL has expired (BFL keeps results for ten minutes): generate again",
                r.status_code,
            )
        if r.status_code >= 400:
            raise HostedError(f"task {tid} download: HTTP {r.status_code}", r.status_code)
        try:
            with Image.open(io.BytesIO(r.content)) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError):
            raise HostedError(f"task {tid}: the result is not an image") from None

    def run(self, endpoint: Endpoint, bodies: Sequence[dict], on_done: Callable[[int], None] | None = None) -> list:
        """Submit every body, poll them together with backoff, download each as soon as it is Ready.

        Returns [(image, task, result)] in order. When a task fails (or a submission is refused), the
        tasks already submitted still run to the end, and the error raised carries what was made in
        `partial` ({index: (image, task, result)}), so nothing produced (and paid for) is lost.
        """
        tasks: list[dict] = []
        failed: dict[int, HostedError] = {}
        for i, body in enumerate(bodies):
            try:
                tasks.append(self.submit(endpoint, body))
            except HostedError as e:
                failed[i] = e
                break
        done: dict[int, tuple[Image.Image, dict, dict]] = {}
        interval, started = self.poll_interval, time.monotonic()
        while pending := [i for i in range(len(tasks)) if i not in done and i not in failed]:
            for i in pending:
                task = tasks[i]
                try:
                    data = self.poll(task)
                    if data is None:
                        continue
                    sample = (data.get("result") or {}).get("sample")
                    if not sample:
                        raise HostedError(f"task {task['id']} is Ready but has no result.sample")
                    done[i] = (self.download(sample, task["id"]), task, data.get("result") or {})
                except HostedError as e:
                    failed[i] = e
                    continue
                if on_done:
                    on_done(i)
            if all(i in done or i in failed for i in range(len(tasks))):
                break
            if time.monotonic() - started > self.max_wait:
                for i in pending:
                    if i not in done and i not in failed:
                        failed[i] = HostedError(f"task {tasks[i]['id']} not ready after {self.max_wait:.0f} s")
                break
            self.sleep(interval)
            interval = min(interval * 1.5, self.max_poll_interval)
        if failed:
            first = failed[min(failed)]
            error = first
            if len(bodies) > 1:
                error = HostedError(f"{len(done)} of {len(bodies)} images made; {first}", first.status, first.charged)
            error.partial = done
            raise error
        return [done[i] for i in range(len(tasks))]


class HostedPipeline:
    """A hosted model behind the `Pipeline` call: same arguments, same image metadata (plus the task
    id, endpoint and reported cost). Each image is one task; tasks run concurrently on BFL's side."""

    def __init__(
        self,
        model_id: str,
        client: BflClient | None = None,
        *,
        location: str | None = None,
        safety_tolerance: int = SAFETY_DEFAULT,
        output_format: str = "png",
        prompt_upsampling: bool | None = None,
    ) -> None:
        self.endpoint = endpoint(model_id)
        self.variant: Variant = get_variant(model_id)
        if not 0 <= safety_tolerance <= self.endpoint.safety_max:
            raise ValueError(f"safety_tolerance {safety_tolerance} is out of range 0..{self.endpoint.safety_max}")
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        self.client = client or BflClient(location=location)
        self.safety_tolerance, self.output_format = safety_tolerance, output_format
        self.prompt_upsampling = prompt_upsampling
        self.loras: list = []
        self.weights_hash = ""

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> None:
        if loras:
            raise ValueError(f"{self.variant.id} runs on the hosted API, which takes no LoRA files")

    def check(self, prompt: str | Sequence[str] | GenerationSettings, **fields: Any) -> list[int]:
        """The call's checks alone, nothing sent (`Pipeline.check`): the seed of each image."""
        return self._checked(GenerationSettings.of(prompt, **fields))[3]

    def _checked(self, s: GenerationSettings) -> tuple[GenerationSettings, str | None, tuple[str, ...], list[int]]:
        """The settings resolved by the endpoint's rules (images given as paths opened, as the local call does),
        Kontext's aspect ratio, the prompt and seed of each image."""
        s = with_seeds_counted(opened_settings(s))
        s = s.replace(refs=tuple(as_seen(r) for r in s.refs))  # upright: the API gets pixels, not EXIF tags
        prompts = s.prompts
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of them")
        if s.aspect is not None and s.aspect not in ASPECTS:
            raise ValueError(f"aspect {s.aspect!r} is not one of {', '.join(ASPECTS)}")
        s, kontext = check_request(self.endpoint, s, [r.size for r in s.refs])
        prompts = tuple(p for p in prompts for _ in range(s.num_images))
        if s.seeds is None and not whole(s.seed):
            raise ValueError(f"seed must be an integer in 0..2**32-1 for hosted models, got {s.seed!r}")
        seeds = list(s.seeds) if s.seeds is not None else [s.seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds given for {len(prompts)} images: give one per image")
        for seed in seeds:
            if not whole(seed) or not 0 <= seed < 2**32:
                raise ValueError(f"seed must be an integer in 0..2**32-1 for hosted models, got {seed!r}")
        return s, kontext, prompts, seeds

    def __call__(
        self, prompt: str | Sequence[str] | GenerationSettings, *, callback: Callable | None = None, **fields: Any
    ) -> list[Image.Image]:
        """The local pipeline's call (`GenerationSettings`); `prompt_upsampling` for this call only (default: the
        pipeline's), the API's, where it has one."""
        s, kontext, prompts, seeds = self._checked(GenerationSettings.of(prompt, **fields))
        refs, (width, height), steps, guidance = s.refs, s.size, s.steps, s.guidance
        encoded = [encode_image(r) for r in refs]
        upsampling = self.prompt_upsampling if s.prompt_upsampling is None else s.prompt_upsampling
        reqs = [
            HostedRequest(p, width, height, s, steps, guidance, kontext) for p, s in zip(prompts, seeds, strict=True)
        ]
        bodies = [payload(self.endpoint, r, encoded, safety_tolerance=self.safety_tolerance,
                          output_format=self.output_format, prompt_upsampling=upsampling)
                  for r in reqs]  # fmt: skip
        count = [0]

        def done(_i: int) -> None:
            count[0] += 1
            if callback:
                callback(count[0] - 1, len(bodies), None)

        def finished(i: int, image: Image.Image, task: dict, result: dict) -> Image.Image:
            meta = self.metadata(reqs[i], refs, task, result, image, upsampling)
            image.info["flux2"] = json.dumps(meta)
            image.info["parameters"] = parameters_text(meta)
            return image

        try:
            results = self.client.run(self.endpoint, bodies, on_done=done)
        except HostedError as e:  # hand over what was made: `e.images` = [(index, image)]
            e.images = [(i, finished(i, *r)) for i, r in sorted(getattr(e, "partial", {}).items())]
            raise
        return [finished(i, *r) for i, r in enumerate(results)]

    def metadata(
        self, req: HostedRequest, refs: Sequence[Image.Image], task: dict, result: dict, image, upsampling: bool | None
    ) -> dict:
        """The local metadata keys, plus what identifies the hosted task; never the key."""
        return {
            "prompt": req.prompt,
            "negative_prompt": None,
            "model": self.variant.id,
            "weights_hash": "",
            "seed": req.seed,
            "steps": req.steps,
            "guidance": req.guidance if req.guidance is not None else 1.0,
            "width": image.width,
            "height": image.height,
            "refs": [image_hash(r) for r in refs],
            "dtype": None,
            "device": "api",
            "loras": [],
            "version": __version__,
            "hosted": {
                "endpoint": self.endpoint.path,
                "api": self.client.base,
                "task_id": task["id"],
                "cost": task.get("cost"),
                "aspect_ratio": req.aspect,
                "safety_tolerance": self.safety_tolerance,
                "prompt_upsampling": upsampling,
                "upsampled_prompt": result.get("prompt") if result.get("prompt") != req.prompt else None,
            },
        }
