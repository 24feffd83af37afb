"""The output directory: its file names, and its check against a plan (new, resume, --extend, --force).

It holds: `sweep.toml` (the file as given), `plan.json` (the resolved plan and its hash),
`results.jsonl` / `results.errors.jsonl` / `results.activations/` (written by JsonlWriter, as engine-run writes them),
`status.json` (rewritten every few seconds), `sweep.log`, and at the end the report (engine.apps.sweep.report).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.storage.files import move_aside, write_atomic, write_problem
from engine.apps.sweep.fields import SweepError, preview
from engine.apps.sweep.plan import Plan

log = logging.getLogger("engine.apps.sweep.outdir")

RESULTS, ERRORS, PLAN, STATUS, LOG = "results.jsonl", "results.errors.jsonl", "plan.json", "status.json", "sweep.log"


def settings_diff(old, new, path: str = "") -> list[str]:
    """What changed between two plans' settings, one `path: was X, now Y` per leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in settings_diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]
    if old == new:
        return []
    if isinstance(old, list) and isinstance(new, list):
        added, removed = [x for x in new if x not in old], [x for x in old if x not in new]
        parts = ([f"added {', '.join(map(str, added))}"] if added else []) + (
            [f"removed {', '.join(map(str, removed))}"] if removed else [])
        return [f"{path}: {'; '.join(parts) or 'reordered'}"]
    return [f"{path}: was {preview(old)}, now {preview(new)}"]


def extension_problems(old: dict, new: dict) -> list[str]:
    """Why `new` is not `old` plus more requests (empty: --extend may run it, redoing nothing)."""
    grown = ("models", "prompts", "vectors", "adapters", "points", "samples")
    problems = [line for key in sorted(set(old) | set(new)) if key not in grown
                for line in settings_diff(old.get(key), new.get(key), key)]
    for section in ("models", "prompts", "vectors", "adapters"):  # adapters: only in plans that use one
        for name, value in old.get(section, {}).items():
            if new.get(section, {}).get(name) != value:
                problems.append(f"{section}.{name}: {'removed' if name not in new.get(section, {}) else 'changed'}")
    removed = [key for key in old["points"] if key not in new["points"]]
    if removed:
        problems.append(f"points: removed {', '.join(removed)}")
    if new["samples"] < old["samples"]:
        problems.append(f"samples: was {old['samples']}, now {new['samples']}")
    return problems


def prepare_directory(out: Path, plan: Plan, force: bool, extend: bool) -> str:
    """Check `out` against the plan, then write the sweep file's copy and plan.json. Returns what happens:
    `new`, `resume`, `extend` or `replaced`; SweepError when the sweep changed and neither flag allows it, or when
    `out` cannot be a sweep directory (a file, or in a folder that takes no files)."""
    check_output_dir(out)
    how = _compare(out, plan, force, extend)
    try:
        if how == "replaced":
            [aside] = move_aside([out])
            log.warning("moved the old sweep aside to %s", aside)
        out.mkdir(parents=True, exist_ok=True)
        source = Path(plan.config.source)
        write_atomic(out / f"sweep{source.suffix}", source.read_bytes())
        write_atomic(out / PLAN, (json.dumps(plan.to_json(), indent=2) + "\n").encode())
    except OSError as exc:
        raise SweepError(f"cannot set up the output directory {out} ({why(exc)}); nothing has run: fix that, or "
                         f"choose another output, and run again") from None
    return how


def check_output_dir(out: Path) -> None:
    """Before anything starts: `out` is a directory or can be made one, in a folder that takes files (probed with a
    temporary file); SweepError names the path and the fix."""
    try:
        if out.exists() and not out.is_dir():
            raise SweepError(f"output {out} is a file; a sweep writes a directory; choose another output (the sweep "
                             f"file's `output`, or --output)")
    except OSError as exc:  # e.g. a name too long for the file system
        raise SweepError(f"output {out}: cannot use it ({why(exc)}); choose another output") from None
    problem = write_problem(out)
    if problem:
        raise SweepError(f"output {out}: {problem}; choose a directory you can write to") from None


def why(exc: OSError) -> str:
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else f"{type(exc).__name__}: {exc}"


def _compare(out: Path, plan: Plan, force: bool, extend: bool) -> str:
    plan_file = out / PLAN
    if not plan_file.exists():
        if (out / RESULTS).exists():
            raise SweepError(f"{out} holds {RESULTS} but no {PLAN}: it is not a sweep directory. Use another output.")
        return "new"
    try:
        old = json.loads(plan_file.read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SweepError(f"{plan_file} cannot be read ({exc}); pass --force to set the directory aside") from None
    if old == plan.settings:
        return "resume"
    if force:
        return "replaced"
    changes = settings_diff(old, plan.settings)
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    if extend:
        problems = extension_problems(old, plan.settings)
        if not problems:
            return "extend"
        raise SweepError(f"--extend adds grid points, prompt sets, vectors, adapters, models or samples, but this "
                         f"sweep also changes what was run: {'; '.join(problems[:8])}. Use a new output directory, or "
                         f"pass --force to set the old results aside and start again.")
    raise SweepError(f"the sweep file changed since {out} was started ({shown}). Run the file it was started with "
                     f"to resume, pass --extend to run only the added requests (when nothing already run changes), "
                     f"--force to set the old results aside and start again, or use a new output directory.")
