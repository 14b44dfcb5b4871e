"""Which of nano's 4 sampling steps loses prompts? Sample each eval prompt with the teacher (nano-base, CFG, 4
Euler substeps) on some of nano's segments and the student (nano, one step) on the others, and score them.

python docs/nano_segments.py [--weights NANO] [--category three_four] SSSS TTTT SSST TTTS SSTT

Each mode names the 4 segments in order, S for the student and T for the teacher: SSSS is nano as it samples,
TTTT the teacher it was distilled from, SSST the student up to the last segment and the teacher from there.
"""

from __future__ import annotations

import argparse

import torch

from flux2studio import load, sampling
from flux2studio.nano.evaluate import EVAL_SEEDS, evaluate
from flux2studio.variants import get_variant

SUBSTEPS = 4  # the teacher's Euler steps a segment, as in distillation


def sigmas_for(mode: str, segments: list[float]) -> tuple[list[float], str]:
    """The noise levels a mode samples at, and who (S or T) takes the step from each."""
    sigmas, owners = [segments[0]], ""
    for i, who in enumerate(mode):
        n = SUBSTEPS if who == "T" else 1
        sigmas += torch.linspace(segments[i], segments[i + 1], n + 1).tolist()[1:]
        owners += who * n
    return sigmas, owners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modes", nargs="+", help="4 letters each, S (student) or T (teacher) per segment")
    ap.add_argument("--weights", help="nano weights (default: the embedded ones)")
    ap.add_argument("--category", action="append", help="eval prompt category (default: three_four)")
    args = ap.parse_args()
    nano = get_variant("nano")
    if bad := [m for m in args.modes if len(m) != nano.steps or set(m) - {"S", "T"}]:
        ap.error(f"modes {bad}: {nano.steps} letters, each S or T")
    teacher_pipe = load("nano-base", resident=True)
    student = load("nano", weights=args.weights, resident=True).transformer
    teacher = teacher_pipe.transformer
    teacher_forward = teacher.forward
    segments = sampling.schedule(nano.steps, 64, nano.mu).tolist()  # nano's mu does not depend on the size
    schedule = sampling.schedule
    for mode in args.modes:
        sigmas, owners = sigmas_for(mode, segments)
        pending: list[torch.Tensor] = []

        def forward(x, img_ids, txt, txt_ids, t, *rest, sigmas=sigmas, owners=owners, pending=pending):
            step = min(range(len(owners)), key=lambda j: abs(sigmas[j] - float(t[0])))
            if owners[step] == "T":
                return teacher_forward(x, img_ids, txt, txt_ids, t, *rest)
            # CFG calls the conditional velocity first, then the unconditional one: both get the student's, so
            # the guided velocity is the student's own
            if not pending:
                pending.append(student(x, img_ids, txt, txt_ids, t, *rest))
                return pending[0]
            return pending.pop()

        teacher.forward = forward
        sampling.schedule = lambda *_, sigmas=sigmas: torch.tensor(sigmas, dtype=torch.float32)
        try:
            r = evaluate(teacher_pipe, categories=args.category or ["three_four"], steps=len(owners))
        finally:
            sampling.schedule, teacher.forward = schedule, teacher_forward
        attrs = ", ".join(f"{k} {v:.1%}" for k, v in r.by_attribute.items() if k in ("color", "shape", "size", "count"))
        print(f"{mode}  fully correct {r.correct:.1%} of {r.images} (seeds {list(EVAL_SEEDS)})  {attrs}")


if __name__ == "__main__":
    main()
