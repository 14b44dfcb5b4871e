"""One pipeline used from several threads (a Python program serving its own users): calls take turns, each with
its own request's state (the request being generated, its work memory under a budget, its VAE tiles, its LoRAs),
and each image is the one a call of its own makes."""

import json
import threading

import torch

from flux2studio.pipeline import Pipeline
from tiny import klein_pipeline


class _Turns:
    """Stands in for a pipeline's lock, telling when a thread is waiting for its turn."""

    def __init__(self, lock) -> None:
        self.lock, self.waiting = lock, threading.Event()

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            self.waiting.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


def test_calls_from_two_threads_take_turns_and_make_their_own_images():
    """A second thread calling while the first is generating waits for its turn: none of its steps runs before
    the first call has finished; each image (and its metadata, which records the call's VAE tile) is the one made
    alone. Bad input is refused at once, without waiting."""
    pipe: Pipeline = klein_pipeline(budget=2**40)  # a budget: each call plans its own work
    pipe.vae_tile = 256
    big, small = dict(size=(512, 384), steps=2, seed=1), dict(size=(128, 128), steps=2, seed=2)
    alone = {"big": pipe("a red circle", **big)[0], "small": pipe("a blue square", **small)[0]}
    turns = pipe._busy = _Turns(pipe._busy)
    events, got = [], {}

    def second() -> None:
        got["small"] = pipe("a blue square", callback=lambda i, n, x: events.append(("small", i)), **small)[0]

    thread = threading.Thread(target=second)

    def first_steps(i: int, n: int, x: torch.Tensor) -> None:
        events.append(("big", i))
        if i == 0:  # mid-generation: the other thread calls, and waits
            thread.start()
            assert turns.waiting.wait(timeout=120), "the second call did not wait for its turn"
            try:
                pipe("x", size=(512, 384), steps=0)
            except ValueError as e:
                events.append(("refused", str(e)))

    got["big"] = pipe("a red circle", callback=first_steps, **big)[0]
    thread.join()
    assert events[0] == ("big", 0) and events[1][0] == "refused" and "steps 0" in events[1][1]
    assert [e[0] for e in events[2:]] == ["big", "small", "small"]  # the small call's steps after the big one's
    for name in ("big", "small"):
        assert got[name].tobytes() == alone[name].tobytes()
        assert json.loads(got[name].info["flux2"]) == json.loads(alone[name].info["flux2"])
    assert json.loads(got["big"].info["flux2"])["vae_tile"] == 256
    assert "vae_tile" not in json.loads(got["small"].info["flux2"])
