"""Prompt-adherence eval (GenEval-style) of a model on the Shapes world's fixed prompt set.

Generates every eval prompt with several fixed seeds, scores each image with the checker, and
reports the fraction of images fully correct overall and per category, plus per-attribute accuracy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..pipeline import Pipeline, resolve_upsampling, whole
from .checker import check
from .shapes import EVAL_CATEGORIES, eval_prompts

EVAL_SEEDS = (0, 1, 2)  # every prompt is drawn with each of these seeds
ATTRIBUTES = ("color", "shape", "size", "position", "count", "relation", "background", "lighting", "negation")


@dataclass(frozen=True)
class EvalResult:
    model: str
    images: int
    correct: float  # fraction of images fully correct
    by_category: dict[str, float]
    by_attribute: dict[str, float]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    guidance_interval: tuple[float, float] | None = None  # CFG models only
    prompt_upsampling: bool = False  # prompts rewritten by the model's planner (scored as written)
    weights_hash: str = ""
    setup: dict = field(default_factory=dict)  # Pipeline.setup(): dtype, quantization, LoRAs, ... (what was scored)

    def table(self) -> str:
        interval = "" if self.guidance_interval is None else " at t in [{}, {}]".format(*self.guidance_interval)
        planned = ", prompts upsampled" if self.prompt_upsampling else ""
        setup = self.setup
        how = ", ".join([f"{setup.get('dtype', '?')}", *([setup["quantize"]] if setup.get("quantize") else []),
                         *(f"LoRA {r['file']} x{r['scale']}" for r in setup.get("loras", []))])  # fmt: skip
        lines = [f"model {self.model} ({how}): {self.images} images, {self.steps} steps, guidance {self.guidance}"
                 f"{interval}{planned}",
                 f"{'fully correct':<16} {self.correct:6.1%}"]  # fmt: skip
        lines += [f"  {k:<14} {v:6.1%}" for k, v in self.by_category.items()]
        lines += ["per attribute"] + [f"  {k:<14} {v:6.1%}" for k, v in self.by_attribute.items()]
        return "\n".join(lines)


def evaluate(
    pipe: Pipeline,
    seeds: Sequence[int] = EVAL_SEEDS,
    limit: int | None = None,
    batch: int = 16,
    steps: int | None = None,
    guidance: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    categories: Sequence[str] | None = None,
    guidance_interval: tuple[float, float] | None = None,
    prompt_upsampling: bool | None = None,
) -> EvalResult:
    """Run the eval; `categories` keeps those prompt categories only, `limit` then takes an evenly spread subset
    of the prompts (both for quick checks in training). `prompt_upsampling` as the pipeline takes it (default:
    the model's); every image is scored against the prompt as written."""
    prompts = eval_prompts()
    if categories:
        if unknown := set(categories) - set(EVAL_CATEGORIES):
            raise ValueError(f"unknown eval category {', '.join(sorted(unknown))}: one of {', '.join(EVAL_CATEGORIES)}")
        prompts = [p for p in prompts if p.category in categories]
    if limit is not None and (not whole(limit) or limit < 1):
        raise ValueError(f"limit {limit!r} must be a whole number of prompts, at least 1")
    if limit:
        prompts = prompts[:: max(1, len(prompts) // limit)][:limit]
    jobs = [(p, s) for p in prompts for s in seeds]
    ok: dict[str, list[bool]] = defaultdict(list)
    attrs: dict[str, list[bool]] = defaultdict(list)
    steps = pipe.variant.steps if steps is None else steps
    given = guidance is not None  # to a distilled model: the pipeline's error (it was dropped, yet reported)
    guidance = guidance if given else pipe.variant.guidance
    kw = {"guidance": guidance} if pipe.variant.guidance_mode != "none" or given else {}
    if pipe.variant.uses_cfg or guidance_interval is not None:  # the pipeline refuses it for others
        kw["guidance_interval"] = guidance_interval = tuple(guidance_interval or pipe.variant.guidance_interval)
    upsampling = resolve_upsampling(pipe.variant, prompt_upsampling)
    if prompt_upsampling is not None:
        kw["prompt_upsampling"] = prompt_upsampling
    pipe.check(prompts[0].text, steps=steps, seeds=list(seeds)[:1], **kw)  # before any image (steps 0 ran 4)
    done = 0
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        for (p, _), image in zip(chunk, _generate(pipe, chunk, steps, kw), strict=True):
            score = check(image, p.constraints)
            ok["all"].append(score.correct)
            ok[p.category].append(score.correct)
            for name, good in score.attributes.items():
                attrs[name].append(good)
        done += len(chunk)
        if progress:
            progress(done, len(jobs))
    frac = {k: sum(v) / len(v) for k, v in ok.items()}
    return EvalResult(
        model=pipe.variant.id,
        images=len(jobs),
        correct=frac.pop("all"),
        by_category=dict(sorted(frac.items())),
        by_attribute={a: sum(attrs[a]) / len(attrs[a]) for a in ATTRIBUTES if attrs[a]},
        seeds=tuple(seeds),
        steps=steps,
        guidance=guidance,
        guidance_interval=guidance_interval,
        prompt_upsampling=upsampling,
        weights_hash=pipe.weights_hash,
        setup=pipe.setup(),
    )


def _generate(pipe: Pipeline, chunk, steps: int, kw: dict) -> list:
    return pipe([p.text for p, _ in chunk], seeds=[seed for _, seed in chunk], steps=steps, **kw)
