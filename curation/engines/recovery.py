"""Keep a long run alive through transient engine failures, and stop clearly on persistent ones.

Out of memory, a timeout or a server restart usually passes: retry the batch.
A batch that keeps failing may just be too big: split it in halves and try
each. A single request that still fails stops the run with an EngineFailure
naming it; the stages above have already committed every finished shard.

An engine that retries each request itself (`retries_requests = True`, the
openai backend, whose client retries with backoff) is called once: stacking
this layer's retries and splits on top would multiply the attempts on a dead
server, and a server's load does not shrink with our batch. Its error names
the failing request itself, and the EngineFailure carries that message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from curation.engines.base import Generation, SamplingParams, TextEngine, check_paired

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineFailure(RuntimeError):
    """The engine failed on a request even after retries and splitting."""


def attempts_for(engine: object, retries: int) -> int:
    """Calls to try an engine: once when its client retries each request itself (stacked, the attempts
    multiply), else 1 + `retries`."""
    return 1 if getattr(engine, "retries_requests", False) else retries + 1


def with_retries(call: Callable[[], T], *, attempts: int, backoff_s: float, what: str,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, tried up to `attempts` times with a doubling pause between; the last error goes up."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return call()
        except (KeyboardInterrupt, EngineFailure):
            raise
        except Exception as exc:  # noqa: BLE001 - any backend error is retried, then reported
            log.warning("%s failed (attempt %d/%d): %s", what, attempt + 1, attempts, exc)
            _release_memory()
            if attempt + 1 == attempts:
                raise
            sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def generate_with_recovery(engine: TextEngine, prompts: Sequence[str], params: Sequence[SamplingParams], *,
                           retries: int = 2, backoff_s: float = 1.0, stop: Sequence[str] = (),
                           sleep: Callable[[float], None] = time.sleep) -> list[Generation]:
    """engine.generate with `retries` retries per batch, then halving; raises EngineFailure at one request."""
    check_paired(prompts, params)
    if not prompts:
        return []
    return _recover(engine, list(prompts), list(params), retries, backoff_s, stop, sleep, {"ok": 0})


def _recover(engine: TextEngine, prompts: list[str], params: list[SamplingParams], retries: int, backoff_s: float,
             stop: Sequence[str], sleep: Callable[[float], None], done: dict[str, int]) -> list[Generation]:
    """One batch of `generate_with_recovery`; `done` counts the generations its calls have returned, so a
    failure where none came back is told as the engine's, not one request's."""
    retried_inside = bool(getattr(engine, "retries_requests", False))
    attempts = attempts_for(engine, retries)

    def call() -> list[Generation]:
        out = engine.generate(prompts, params, stop=stop) if stop else engine.generate(prompts, params)
        if len(out) != len(prompts):
            raise RuntimeError(f"engine returned {len(out)} generations for {len(prompts)} prompts")
        return out

    name = getattr(engine, "name", "?")
    try:
        out = with_retries(call, attempts=attempts, backoff_s=backoff_s, sleep=sleep,
                           what=f"engine {name} on {len(prompts)} prompts")
        done["ok"] += len(out)
        return out
    except EngineFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - reported below, or the batch is split
        error = exc
    if retried_inside:
        raise EngineFailure(f"engine {name} failed with the engine's own retries, in a call of {len(prompts)} "
                            f"request(s): {type(error).__name__}: {error}") from error
    if len(prompts) == 1:  # the caption sits at the prompt's end: its tail finds the row that breaks the engine
        down = "" if done["ok"] else "; no request of this batch has succeeded yet: if this one looks fine, the " \
            "engine itself may be down"
        raise EngineFailure(f"engine {name} failed on 1 request(s) after {attempts} attempts: "
                            f"{type(error).__name__}: {error} (prompt ending {prompts[0][-100:]!r}){down}") from error
    half = len(prompts) // 2
    return (_recover(engine, prompts[:half], params[:half], retries, backoff_s, stop, sleep, done)
            + _recover(engine, prompts[half:], params[half:], retries, backoff_s, stop, sleep, done))


def _release_memory() -> None:
    """After an out-of-memory error, give cached GPU blocks back before the retry."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
