"""The one stage runner: every stage of the reproduction (and of the mini world) runs through it.

A stage has a name, the part of the config that decides its result, the stages it reads, and a
function ``fn(ctx) -> dict``. Its *key* is the hash of its name, its config (speed-only settings
aside, ``config.key_of``) and the identities of its inputs (their keys and when each was made). So:

- a second run with the same settings reuses the stage's recorded result (``OUT/stages/NAME.json``);
- a changed setting, or a redone input, redoes the stage and so everything downstream of it;
- ``force={"NAME"}`` redoes the stage even when cached, and everything downstream of it follows;
- a stage that was interrupted under the same key *resumes*: its folder ``OUT/NAME/`` (checkpoints,
  caches) is kept and ``ctx.resume`` is True; a stage started under another key, or forced, starts
  from an empty folder. The runner only ever deletes a stage folder it created itself (it holds the
  runner's ``.stage`` marker).

A stage that raises stops the run (the exception propagates; nothing is recorded as done); a typed
``KdqError`` carries the stage's name as ``.stage``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdq.errors import KdqError

from musicgen.config import digest, key_of
from musicgen.files import write_json

MARKER = ".stage"  # a stage folder the runner made: holds the key it was started under


class PipelineError(KdqError):
    """A stage graph that cannot run (an input that has not run yet, a folder the runner did not make)."""


@dataclass
class Context:
    """What a stage function gets: its folder, whether it resumes, and its inputs' results."""

    name: str
    folder: Path
    resume: bool
    inputs: dict[str, dict]
    progress: bool = True


@dataclass
class Pipeline:
    """Runs stages in order with a JSON record per stage in ``OUT/stages/``.

    Args:
        out: the run's folder.
        force: stage names to redo even when cached (their dependents follow).
        progress: passed to stages (progress bars).
    """

    out: Path
    force: set[str] = field(default_factory=set)
    progress: bool = True
    results: dict[str, dict] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)
    _ids: dict[str, str] = field(default_factory=dict)

    def key(self, name: str, config: Any, inputs: tuple[str, ...]) -> str:
        missing = [i for i in inputs if i not in self._ids]
        if missing:
            raise PipelineError(f"stage {name!r} reads {missing}, which have not run in this pipeline yet")
        return digest({"stage": name, "config": key_of(config), "inputs": {i: self._ids[i] for i in inputs}})

    def run(self, name: str, config: Any, fn: Callable[[Context], dict], *, inputs: tuple[str, ...] = ()) -> dict:
        """Run ``fn`` (or reuse its recorded result); return the result dict."""
        key = self.key(name, config, inputs)
        record_path = self.out / "stages" / f"{name}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if name not in self.force and record and record.get("key") == key:
            return self._done(name, record, cached=True)
        folder = self.out / name
        marker = folder / MARKER
        resume = name not in self.force and marker.exists() and marker.read_text() == key and record is None
        if not resume:
            self._clear(folder)
            if record_path.exists():
                record_path.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
        if self.progress:
            print(f"[reproduce] {name}{' (resuming)' if resume else ''} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn(Context(name, folder, resume, {i: self.results[i] for i in inputs}, self.progress))
        except KdqError as e:
            if getattr(e, "stage", None) is None:
                e.stage = name  # the stage a command line's one-line error names
            raise
        record = {"key": key, "result": result, "wall_s": round(time.perf_counter() - t0, 2), "done_at": time.time()}
        write_json(record_path, record)
        if self.progress:
            print(f"[reproduce] {name}: done ({record['wall_s']:.1f} s)", flush=True)
        return self._done(name, record, cached=False)

    def _clear(self, folder: Path) -> None:
        if not folder.exists():
            return
        if not (folder / MARKER).exists() and any(folder.iterdir()):
            raise PipelineError(f"{folder} exists and was not made by this pipeline (no {MARKER} marker); "
                                "move it away or choose another --out")
        shutil.rmtree(folder)

    def _done(self, name: str, record: dict, *, cached: bool) -> dict:
        self.results[name] = record["result"]
        self._ids[name] = f"{record['key']}:{record['done_at']}"  # a redone input changes its dependents' keys
        self.stages[name] = {"wall_s": record["wall_s"], "cached": cached}
        return record["result"]
