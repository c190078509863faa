"""Autotuned backend choice: time the valid backends once per call signature, remember the winner.

Like cuDNN's benchmark mode or Triton's autotune: the first call with a new
signature (layer shape, batch, dtype, device, grad mode, thread count) runs
every candidate backend a few times on the real inputs and keeps the fastest.
Winners are kept in memory and in a small JSON file under the user cache
directory, one file per (format, torch version, CPU model) fingerprint, so a
new torch or another CPU starts from an empty cache:

    $PADNET_CACHE_DIR, else $XDG_CACHE_HOME/padnet, else ~/.cache/padnet

Tuning cost is bounded: a warm-up of every candidate first, then up to three
timed runs per candidate, fastest warm-up first (candidates clearly slower on
their warm-up are not repeated), and no new trial starts once
:data:`TUNE_BUDGET_S` seconds (``PADNET_AUTOTUNE_BUDGET_S``, default 0.5) have
been spent on one signature (so at most the budget plus two calls). When the
two fastest are within :data:`CLOSE_MARGIN` of each other they alternate a few
more runs (within the same budget), so drift between their time slots does not
decide.

A choice read from disk was made in another process, possibly under load, so
it is confirmed once per process before it is trusted: the stored winner is
timed against its rivals -- the stored runner-up (the second fastest if it was
within :data:`RIVAL_FACTOR` of the winner, else a candidate the budget left
untimed) and the rule's choice, where they differ from it (a warm-up each, then
up to three alternating rounds within the budget). If the winner is more than
:data:`CONFIRM_TOLERANCE` slower than either, the signature is tuned again and
the file updated; otherwise the stored choice stands. A stored choice that is
the rule's and has no runner-up is used as stored.

``PADNET_AUTOTUNE=0`` (or :func:`set_autotune`\\ (False), or an explicit backend
name) turns tuning off; the deterministic cost rule of
:mod:`.backend_selection` decides then, and always while exporting.
The file holds only backend names; a damaged file is ignored (and replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import torch

FORMAT = 3  # 3: runner-up stored beside the winner (confirmed once per process); 2: candidate set in the key
MAX_ENTRIES = 4096  # on-disk entries kept (oldest dropped first)
TRIAL_REPEATS = 3
SLOW_FACTOR = 4.0  # a candidate whose warm-up is this much slower than the best so far is not repeated
CLOSE_MARGIN = 0.15  # the two fastest within this fraction of each other alternate TRIAL_REPEATS more runs
CONFIRM_TOLERANCE = 0.10  # a stored winner this much slower than its stored runner-up is tuned again (not less:
# timings of one process move 5-10 % between slots on a shared host, and a flip costs a full tune)
RIVAL_FACTOR = 2.0  # a second fastest within this factor of the winner is stored as its runner-up
MAX_FILE_BYTES = 16 << 20  # a larger cache file is not read (it is replaced on the next record)

_ENABLED: bool | None = None  # None: read PADNET_AUTOTUNE
_MEMORY: dict[tuple, str] = {}
_DISK: dict[str, str] | None = None  # entries of this fingerprint's file, loaded lazily
_RUNNERS_UP: dict[str, str] = {}  # the file's runner-up per entry (loaded with _DISK)
_DISK_WARNED = False
_GENERATION = 0  # bumped whenever a cached decision may no longer hold (settings changed, cache cleared)


def generation() -> int:
    """Changes whenever decisions derived from this module must be forgotten."""
    return _GENERATION


def forget_decisions() -> None:
    """Bump :func:`generation`: every decision kept from it (the backends' memo, the layers' batch-1
    choices) is made again on its next use -- e.g. once the compiled kernel library becomes available."""
    global _GENERATION
    _GENERATION += 1


def _budget_from_env() -> float:
    raw = os.environ.get("PADNET_AUTOTUNE_BUDGET_S", "0.5")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"PADNET_AUTOTUNE_BUDGET_S must be a number of seconds, got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"PADNET_AUTOTUNE_BUDGET_S must be >= 0, got {raw!r}")
    return value


TUNE_BUDGET_S = _budget_from_env()


def set_autotune(enabled: bool | None) -> None:
    """Turn tuning of ``backend="auto"`` on / off for this process; ``None`` restores ``PADNET_AUTOTUNE``."""
    global _ENABLED, _GENERATION
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_autotune expects True, False or None, got {enabled!r}")
    _ENABLED = enabled
    _GENERATION += 1


def autotune_enabled() -> bool:
    """Whether ``backend="auto"`` tunes: :func:`set_autotune`, else ``PADNET_AUTOTUNE`` (default on)."""
    if _ENABLED is not None:
        return _ENABLED
    raw = os.environ.get("PADNET_AUTOTUNE", "1").strip().lower()
    if raw in ("1", "true", "yes", "on", ""):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"PADNET_AUTOTUNE must be 1/0 (true/false, yes/no, on/off), got {raw!r}")


def cache_dir() -> Path:
    """Directory of the on-disk cache (``PADNET_CACHE_DIR`` > ``XDG_CACHE_HOME``/padnet > ~/.cache/padnet)."""
    explicit = os.environ.get("PADNET_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "padnet"


@lru_cache(maxsize=8)
def _cpuinfo(*fields: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line starting with one of ``fields`` (Linux), else ``None``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(fields):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """CPU model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


@lru_cache(maxsize=1)
def cpu_features() -> str:
    """The CPU's feature flags (``/proc/cpuinfo`` ``flags`` / ``Features``, sorted), or ``""`` where unknown.

    Two machines (or VMs) with the same model name can expose different
    instruction sets; code compiled with ``-march=native`` is keyed by these.
    """
    return " ".join(sorted((_cpuinfo("flags", "Features") or "").split()))


def fingerprint() -> dict:
    """What a cached choice depends on beyond its key: file format, torch version, CPU model."""
    return {"format": FORMAT, "torch": torch.__version__, "cpu": cpu_model()}


def cache_path() -> Path:
    """This fingerprint's cache file (another torch / CPU gives another file: old choices never apply)."""
    digest = hashlib.sha1(json.dumps(fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"autotune-{digest}.json"


def _key_text(key: tuple) -> str:
    return json.dumps(key, default=str)


def _strings(table) -> dict[str, str]:
    """The ``str -> str`` items of a JSON object (anything else in an untrusted file is dropped)."""
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, str)}


def _load_disk() -> dict[str, str]:
    global _DISK, _RUNNERS_UP
    if _DISK is None:
        _DISK, _RUNNERS_UP = {}, {}
        path = cache_path()
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                return _DISK  # far larger than this module ever writes: not read, replaced on the next record
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return _DISK  # absent or damaged: start empty (rewritten on the next record)
        if isinstance(data, dict) and data.get("fingerprint") == fingerprint():
            entries = _strings(data.get("entries"))
            _DISK = dict(list(entries.items())[-MAX_ENTRIES:])  # the newest entries
            _RUNNERS_UP = {k: v for k, v in _strings(data.get("runners_up")).items() if k in _DISK}
    return _DISK


def lookup(key: tuple, valid: Iterable[str]) -> str | None:
    """Cached winner for ``key`` (memory, then disk), or ``None``. Choices outside ``valid`` are ignored."""
    hit = _MEMORY.get(key)
    if hit is not None:
        return hit
    hit = _load_disk().get(_key_text(key))
    if hit is not None and hit in tuple(valid):
        _MEMORY[key] = hit
        return hit
    return None


def record(key: tuple, choice: str, runner_up: str | None = None) -> None:
    """Remember ``choice`` for ``key`` in memory and (best effort) on disk, with the ``runner_up`` that a
    later process times it against (:func:`choose`)."""
    global _DISK_WARNED
    _MEMORY[key] = choice
    disk = _load_disk()
    text = _key_text(key)
    disk.pop(text, None)  # re-inserted last: the oldest entries are the ones dropped
    disk[text] = choice
    _RUNNERS_UP.pop(text, None)
    if runner_up is not None and runner_up != choice:
        _RUNNERS_UP[text] = runner_up
    while len(disk) > MAX_ENTRIES:
        oldest = next(iter(disk))
        del disk[oldest]
        _RUNNERS_UP.pop(oldest, None)
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"fingerprint": fingerprint(), "entries": disk, "runners_up": _RUNNERS_UP}, indent=0)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        if not _DISK_WARNED:
            _DISK_WARNED = True
            warnings.warn(f"padnet autotune: cannot write the cache file {path} ({exc}); "
                          "choices are kept in memory only", RuntimeWarning, stacklevel=3)


def clear_autotune_cache(disk: bool = False) -> None:
    """Forget this process's choices; ``disk=True`` also deletes this fingerprint's cache file."""
    global _DISK, _GENERATION
    _MEMORY.clear()
    _DISK = None
    _GENERATION += 1
    if disk:
        cache_path().unlink(missing_ok=True)


def autotune_cache() -> dict[tuple, str]:
    """A copy of this process's choices: key ``(..., grad)`` -> backend."""
    return dict(_MEMORY)


def _timer(device: torch.device) -> Callable[[Callable[[str], None], str], float]:
    """``timed(run, name)``: seconds of one ``run(name)``, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(run: Callable[[str], None], name: str) -> float:
        sync()
        t0 = time.perf_counter()
        run(name)
        sync()
        return time.perf_counter() - t0

    return timed


def tune(key: tuple, candidates: list[str], run: Callable[[str], None], device: torch.device,
         budget_s: float | None = None) -> str:
    """Time ``run(name)`` for each candidate (the first is the fallback), record and return the fastest.

    First every candidate's warm-up, in order (no new one once the budget is
    spent; the first candidate always runs), then up to :data:`TRIAL_REPEATS`
    timed runs each, fastest warm-up first, within the budget; a candidate
    :data:`SLOW_FACTOR` times slower than the fastest warm-up is not repeated.
    Warm-ups first, because one call of a poor candidate can take a large part
    of the budget: on an AMD EPYC (Zen 3) the rule's ``"output"`` at 512@4,
    batch 32, took 0.26 s a call, so its warm-up and repeats used the whole
    budget and the fused kernel, about 3x faster there, was never timed. Candidates
    that raise (e.g. out of memory) are skipped. Each candidate scores the
    fastest of its runs, warm-up included (load spikes only ever add time); the
    two fastest, when within :data:`CLOSE_MARGIN`, alternate
    :data:`TRIAL_REPEATS` more runs each. The runner-up is recorded too.
    """
    budget = TUNE_BUDGET_S if budget_s is None else budget_s
    timed = _timer(device)
    start = time.perf_counter()

    def over_budget() -> bool:
        return time.perf_counter() - start > budget

    warm: dict[str, float] = {}
    failed = set()
    for i, name in enumerate(candidates):
        if i > 0 and over_budget():
            break
        try:
            warm[name] = timed(run, name)
        except (RuntimeError, MemoryError):
            failed.add(name)
    timings = dict(warm)
    fastest_warm = min(warm.values(), default=float("inf"))
    for name in sorted(warm, key=warm.get):
        if over_budget() or warm[name] >= SLOW_FACTOR * fastest_warm:
            break
        samples = []
        for _ in range(TRIAL_REPEATS):
            samples.append(timed(run, name))
            if over_budget():
                break
        timings[name] = min(warm[name], *samples)  # (load only ever adds time: the warm-up counts too)
    ranked = sorted(timings, key=timings.get)
    if len(ranked) >= 2 and timings[ranked[1]] <= timings[ranked[0]] * (1 + CLOSE_MARGIN):
        for _ in range(TRIAL_REPEATS):  # a close call: alternate, so the two share the same conditions
            if over_budget():
                break
            for name in ranked[:2]:
                timings[name] = min(timings[name], timed(run, name))
        ranked = sorted(timings, key=timings.get)
    choice = ranked[0] if ranked else candidates[0]
    record(key, choice, _runner_up(ranked, timings, [c for c in candidates if c not in timings and c not in failed]))
    return choice


def _runner_up(ranked: list[str], timings: dict[str, float], untimed: list[str]) -> str | None:
    """What a later process confirms the winner against: the second fastest when within
    :data:`RIVAL_FACTOR` of the winner, else the first candidate the budget left untimed, else nothing
    (a far slower second is not worth timing again in every process)."""
    if len(ranked) >= 2 and timings[ranked[1]] <= RIVAL_FACTOR * timings[ranked[0]]:
        return ranked[1]
    return untimed[0] if untimed else None


def _confirmed(stored: str, rival: str, run: Callable[[str], None], device: torch.device,
               budget_s: float | None = None) -> bool:
    """Whether ``stored`` still runs within :data:`CONFIRM_TOLERANCE` of ``rival``.

    A warm-up each; a rival :data:`SLOW_FACTOR` times slower on it settles the matter; otherwise up to
    :data:`TRIAL_REPEATS` rounds in alternating order (no new round once the tuning budget is spent),
    fastest run scored. A stored choice that now fails is not confirmed; a rival that fails is no rival.
    """
    budget = TUNE_BUDGET_S if budget_s is None else budget_s
    timed = _timer(device)
    start = time.perf_counter()
    try:
        best = {stored: timed(run, stored)}
    except (RuntimeError, MemoryError):
        return False
    try:
        best[rival] = timed(run, rival)
    except (RuntimeError, MemoryError):
        return True
    if best[rival] >= SLOW_FACTOR * best[stored]:
        return True
    best = {stored: float("inf"), rival: float("inf")}  # (warm-ups are not scored)
    for r in range(TRIAL_REPEATS):
        if r > 0 and time.perf_counter() - start > budget:
            break
        for name in ((stored, rival) if r % 2 == 0 else (rival, stored)):
            try:
                best[name] = min(best[name], timed(run, name))
            except (RuntimeError, MemoryError):
                return name == rival
    return best[stored] <= best[rival] * (1 + CONFIRM_TOLERANCE)


def choose(key: tuple, candidates: list[str], make_run: Callable[[], Callable[[str], None]],
           device: torch.device, budget_s: float | None = None) -> str:
    """The autotuned choice among ``candidates`` (the first is the rule's) for the signature ``key``.

    From memory if this process decided it; else from disk, after confirming it
    once against its rivals -- the stored runner-up and the rule's choice (the
    first candidate), where they differ from it (see the module docstring); else
    tuned (:func:`tune`). ``make_run()`` builds the trial runner only when timing
    is needed.
    """
    hit = _MEMORY.get(key)
    if hit is not None and hit in candidates:
        return hit
    text = _key_text(key)
    stored = _load_disk().get(text)
    if stored in candidates:
        rivals = [r for r in dict.fromkeys((_RUNNERS_UP.get(text), candidates[0])) if r in candidates and r != stored]
        if not rivals:
            _MEMORY[key] = stored
            return stored
        run = make_run()
        if all(_confirmed(stored, rival, run, device, budget_s) for rival in rivals):
            _MEMORY[key] = stored
            return stored
        return tune(key, candidates, run, device, budget_s)
    return tune(key, candidates, make_run(), device, budget_s)


__all__ = [
    "TUNE_BUDGET_S",
    "autotune_cache",
    "autotune_enabled",
    "cache_dir",
    "cache_path",
    "choose",
    "clear_autotune_cache",
    "cpu_features",
    "cpu_model",
    "fingerprint",
    "forget_decisions",
    "generation",
    "lookup",
    "record",
    "set_autotune",
    "tune",
]
