"""What engine-bench --e2e reports: each command's phases from its --timings stamps, the best script batch size,
ratios to engine-run, steered engine-run's speed against plain, agreement of greedy completions, and the Markdown
table and stacked-phase chart."""

from __future__ import annotations

from engine_bench.report import agreement, fmt, span

PHASES = ("imports", "load", "compile", "capture", "other start-up", "generation", "exit")
READY = {"engine-run": "engine_ready", "hf-script": "load_done"}  # the stamp after which a system generates
COLORS = ("#8c8c8c", "#3b6ea8", "#d08c2c", "#b5523b", "#c9c9c9", "#5a9e5a", "#6b4c9a")
SCRIPT_BATCH_REF = 64  # the write-up's batch size: its row is compared with engine-run beside the best one
STEERED_TARGET = 0.95  # steered engine-run's speed over plain's: steering may cost at most 5%


def row_system(system: str, num_specs: int | None) -> str:
    """A row's system: the program, and for steered engine-run how many distinct vectors it used."""
    return system if num_specs is None else f"{system} steered-{num_specs}"


def stamps_since_start(timings: dict) -> dict[str, float]:
    """A --timings file's stamps as seconds since its process started."""
    start = timings["process_start"]
    return {name: t - start for name, t in timings.items()
            if isinstance(t, (int, float)) and name != "process_start"}


def slowest_core(core_phases: dict[str, dict[str, float]]) -> dict[str, float]:
    """The start-up phases of the core that took longest: the engine is ready when its last core is."""
    return max(core_phases.values(), key=lambda phases: sum(phases.values()), default={})


def phases(system: str, stamps: dict[str, float], core: dict[str, float], wall_s: float,
           launch_s: float) -> dict[str, float | None]:
    """The whole command split into PHASES (they add up to wall_s); None: the system has no such phase here.
    engine-run's imports are its own plus its core's (a spawned process importing torch again), its load, compile
    and capture the core's; the rest of its start-up (spawning, KV cache set-up, sampler warm-up, waiting for the
    workers) is 'other start-up'."""
    ready = stamps[READY[system]]
    if system == "engine-run":
        start = {"imports": stamps["imports_done"] + core.get("imports", 0.0),
                 "load": core.get("tokenizer", 0.0) + core.get("load", 0.0),
                 "compile": core.get("compile"), "capture": core.get("capture")}
    else:
        start = {"imports": stamps["imports_done"], "load": ready - stamps["imports_done"], "compile": None,
                 "capture": None}
    start["imports"] += launch_s  # from the moment the bench started the command
    known = sum(v or 0.0 for v in start.values())
    return {**start, "other start-up": max(0.0, launch_s + ready - known), "generation": stamps["last_result"] - ready,
            "exit": wall_s - launch_s - stamps["last_result"]}


def run_metrics(run: dict, system: str, cache: str, batch_size: int | None, label: str, argv: list[str],
                token_ids: list[list[int]], num_specs: int | None = None, name: str | None = None) -> dict:
    """One command's row: whole-command time, first result, phases, output tokens/s (over the whole command).
    system is the program (engine-run, hf-script); num_specs, for a steered engine-run, its distinct vectors; name,
    the row's system where it is more than those say (engine-run kept-alive)."""
    timings = run["timings"]
    stamps = stamps_since_start(timings)
    launch = max(0.0, timings["process_start"] - run["started_wall"])  # /proc counts in clock ticks: may read early
    core = slowest_core(timings.get("core_phases", {}))
    split = phases(system, stamps, core, run["wall_s"], launch)
    num_tokens = sum(map(len, token_ids))
    return {
        "label": label, "system": name or row_system(system, num_specs), "program": system,
        "num_steering_specs": num_specs,
        "cache": cache, "batch_size": batch_size, "command": argv,
        "exit_code": run["exit_code"], "wall_s": run["wall_s"], "launch_s": launch, "stamps_s": stamps,
        "core_phases": timings.get("core_phases", {}), "phases_s": split,
        "time_to_first_result_s": launch + stamps["first_result"], "generation_s": split["generation"],
        "num_output_tokens": num_tokens, "output_tokens_per_s": num_tokens / run["wall_s"],
        "attn_implementation": timings.get("attn_implementation", "engine" if system == "engine-run" else None),
    }


def best_batch(runs: list[dict]) -> int | None:
    """The script's batch size with the lowest whole-command time, its cold and warm runs added."""
    totals: dict[int, float] = {}
    for m in runs:
        if m["system"] == "hf-script":
            totals[m["batch_size"]] = totals.get(m["batch_size"], 0.0) + m["wall_s"]
    return min(totals, key=totals.__getitem__) if totals else None


def ratios(runs: list[dict], best: int | None) -> dict[str, dict]:
    """Per cache state: hf-script's whole-command time (best batch, batch 64) over engine-run's; above 1, engine-run
    finishes sooner. Each run also gets its own time over engine-run's (vs_engine_run)."""
    wall = {(m["system"], m["batch_size"], m["cache"]): m["wall_s"] for m in runs}
    out = {}
    for m in runs:
        engine = wall.get(("engine-run", None, "warm" if m["cache"] == "loaded" else m["cache"]))
        m["vs_engine_run"] = None if engine is None else m["wall_s"] / engine
    for cache in sorted({m["cache"] for m in runs}):
        engine = wall.get(("engine-run", None, cache))
        if engine is None:
            continue
        best_s, ref_s = wall.get(("hf-script", best, cache)), wall.get(("hf-script", SCRIPT_BATCH_REF, cache))
        out[cache] = {"best_batch_size": best, "best_script_over_engine": None if best_s is None else best_s / engine,
                      f"script_b{SCRIPT_BATCH_REF}_over_engine": None if ref_s is None else ref_s / engine}
    return out


def steered_ratios(runs: list[dict]) -> dict[str, dict]:
    """Per steered engine-run: plain engine-run warm's time over its own, for the whole command and the generation
    phase (the same output tokens, so a speed ratio); the whole command's at least STEERED_TARGET meets the target.
    Each steered run also gets them as vs_unsteered_speed."""
    plain = next((m for m in runs if m["system"] == "engine-run" and m["cache"] == "warm"), None)
    out = {}
    for m in runs:
        if m["num_steering_specs"] is None:
            m["vs_unsteered_speed"] = None
            continue
        ratio = None if plain is None else {"whole_command": plain["wall_s"] / m["wall_s"],
                                            "generation": plain["generation_s"] / m["generation_s"]}
        m["vs_unsteered_speed"] = ratio
        out[m["system"]] = None if ratio is None else {
            **ratio, "target": STEERED_TARGET, "is_within_target": ratio["whole_command"] >= STEERED_TARGET}
    return out


def summarise(report: dict, token_ids: dict[str, list[list[int]]], is_greedy: bool) -> dict:
    """The report's derived parts: best batch size, ratios, steered speed ratios, agreement (greedy only, steered
    runs left out: steering changes what they generate), notes."""
    runs = report["runs"]
    best = best_batch(runs)
    reference = next((m["label"] for m in runs if m["system"] == "engine-run"), runs[0]["label"])
    plain = {m["label"]: token_ids[m["label"]] for m in runs if m["num_steering_specs"] is None}
    derived = {"best_batch_size": best, "ratios": ratios(runs, best), "steered_ratios": steered_ratios(runs),
               "agreement": {reference: agreement(plain, reference)} if is_greedy else {}}
    return {**derived, "notes": e2e_notes({**report, **derived})}


# ---------------------------------------------------------------- Markdown and chart


COLUMNS = ("system", "cache", "batch", "whole command s", "first result s", *(f"{p} s" for p in PHASES),
           "output tok/s", "× engine-run time", "GPU util %", "GPU util in generation %", "GPU mem peak GiB")
STEERED_COLUMNS = ("speed × unsteered, whole", "speed × unsteered, generation")  # only with steered rows


def _batch(m: dict, report: dict) -> str:
    if m["program"] == "engine-run":
        if "max_num_seqs" in report["settings"]["engine_flags_given"]:
            return f"max_num_seqs {report['settings']['max_num_seqs']}"
        default = report["engine_run_defaults"]["max_num_seqs"]
        return f"max_num_seqs {'auto' if default is None else default} (default)"  # auto: the engine's per device
    return f"{m['batch_size']}" + (" (best)" if m["batch_size"] == report["best_batch_size"] else "")


def _same(m: dict, ref: str, agreements: dict) -> str:
    if ref == m["label"]:
        return "ref"
    return "not compared (steered)" if m["label"] not in agreements else (
        f"{agreements[m['label']]['num_identical']}/{agreements[m['label']]['num_compared']}")


def _row(m: dict, report: dict) -> list[str]:
    same = [_same(m, ref, a) for ref, a in report["agreement"].items()]
    speed = m["vs_unsteered_speed"] or {}
    steered = ([fmt(speed.get("whole_command"), 2), fmt(speed.get("generation"), 2)]
               if report["steered_ratios"] else [])
    split = m["phases_s"]
    return [m["system"], m["cache"], _batch(m, report), fmt(m["wall_s"]), fmt(m["time_to_first_result_s"]),
            *(fmt(split[p]) for p in PHASES), fmt(m["output_tokens_per_s"], 0), fmt(m["vs_engine_run"], 2), *steered,
            fmt(m.get("gpu_util_mean_pct")), fmt(m.get("gpu_util_generation_pct")),
            fmt(m.get("gpu_mem_peak_gib"), 2), *same]


def e2e_markdown(report: dict) -> str:
    """The run as a Markdown section: heading, settings, the command line, one row per command run, notes."""
    card, ver, s, w = report["card"], report["versions"], report["settings"], report["workload"]
    head = COLUMNS.index("× engine-run time") + 1
    steered = STEERED_COLUMNS if report["steered_ratios"] else ()
    columns = [*COLUMNS[:head], *steered, *COLUMNS[head:], *(f"same ids as {ref}" for ref in report["agreement"])]
    sampling = ("greedy" if s["temperature"] == 0
                else f"temperature {s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']}")
    engine = f"engine {ver['engine']}" if ver["engine"] else "engine"
    attn = next((m["attn_implementation"] for m in report["runs"] if m["system"] == "hf-script"), None) or "n/a"
    lines = [
        f"### {w['name']} · whole command, cold and warm · {card['name']} · {report['created'][:10]}", "",
        (f"`{s['model']}` {report['dtype']} on {card['name']} (driver {card['driver'] or 'n/a'}, CUDA "
         f"{card['cuda'] or 'n/a'}); torch {ver['torch']}, transformers {ver['transformers']}, {engine}"
         f" at commit {ver['commit'] or 'n/a (no git)'}."),
        (f"Workload {w['name']}: {w['num_prompts']} prompts of {span(w['prompt_tokens'])} tokens, "
         f"{span(w['new_tokens'])} new tokens each (exact, EOS ignored), {w['num_output_tokens']:,} output tokens; "
         f"{sampling}; hf-script attention {attn}, batch sizes {', '.join(map(str, s['batch_sizes']))}."),
        f"`{report['command']}`",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|---|---|" + "---:|" * (len(columns) - 3),
    ]
    lines += ["| " + " | ".join(_row(m, report)) + " |" for m in report["runs"]]
    lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def e2e_notes(report: dict) -> list[str]:
    s = report["settings"]
    given = [f"--{name.replace('_', '-')} {s[name]}" for name in s.get("engine_flags_given", [])]
    if s.get("max_model_len") is not None:
        given.append(f"--max-model-len {s['max_model_len']}")
    out = [f"**{e['systems']} failed** and has no row: {e['error'].splitlines()[0]}" for e in report["errors"]]
    out += [
        "Each row is one fresh process: engine-run (`python -m engine.apps.run`, with its own defaults"
        + (f" but {', '.join(given)}" if given else "")
        + "; JSON: engine_run_defaults) or hf-script (engine_bench/user_script.py, the write-up's "
        "batched loop as a user's script: read JSONL, load, tokenize in chunks of 4 batches, one generate per batch, "
        "batch_decode, write JSONL; it imports torch and transformers only), both loading the same Hugging Face "
        f"directory ({report['model_dir']}) and reading the same prompts file"
        + (" (steered engine-run: the same records, steered; see below)." if report["steered_ratios"] else "."),
        ("Whole command: timed by engine-bench from just before it started the process to the process's exit. First "
         "result and phases come from the command's own --timings stamps (process start read from /proc), in seconds "
         "from the command's start; output tok/s is over the whole command."),
        ("engine-run's phases: imports = the command's imports plus its engine core's (a spawned process that imports "
         "torch again); load = the core's tokenizer and model load; compile and capture = the core's torch.compile "
         "warm-up and CUDA-graph capture (n/a: not done on this device); other start-up = the rest until the engine "
         "was ready (spawning, KV cache set-up, sampler warm-up, waiting for the other workers); generation = from "
         "ready to the last result written; exit = from there to the process's end (flush, stopping the workers). "
         "The cores' own phase seconds are in the JSON (core_phases). hf-script's phases: imports, load (tokenizer "
         "and from_pretrained onto the device), generation (tokenization included), exit; it has no compile or "
         "capture step."),
        ("Cold: the command's ENGINE_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and CUDA_CACHE_PATH were "
         "empty folders; warm: the same command again right after, over what the cold run left there (hf-script "
         "too: the CUDA driver caches its kernels' JIT builds in CUDA_CACHE_PATH). The OS page cache was not "
         "dropped, so the model's files are read from memory both times."),
        ("× engine-run time: the row's whole-command time over engine-run's at the same cache state (above 1: "
         "engine-run finished sooner). Best batch: the hf-script batch size with the lowest cold + warm time."),
    ]
    if report["card"]["driver"]:
        out.append("GPU util is NVML utilization.gpu sampled at "
                   f"{s['sample_hz']:g} Hz over the whole command, and over its generation phase alone; GPU mem is "
                   "the card's used memory (NVML), peak over the whole command.")
    out += steered_notes(report)
    if any(m["cache"] == "loaded" for m in report["runs"]):
        out.append("engine-run kept-alive: engine-run --keep-alive 10m, after the other engine-run rows, over their "
                   "cache folders: warm, it starts the resident engine (caches warm) and hands it its records; "
                   "loaded, the same command again finds that engine loaded and runs in it (its phases: the "
                   "command's own imports, then the hand-over as other start-up). × engine-run time of a loaded "
                   "row is over engine-run warm's. The resident engine is ended before the next system runs.")
    if report["agreement"]:
        ref = next(iter(report["agreement"]))
        out.append(f"Same ids as {ref}: greedy completions token for token equal to its, over every prompt "
                   "(batching reorders floating-point sums, so bf16 runs may differ after some tokens)"
                   + ("; steered runs are not compared: steering changes what they generate." if
                      report["steered_ratios"] else "."))
    return out


def steered_notes(report: dict) -> list[str]:
    """What the steered rows ran and what their speed ratios mean, and each one's verdict against the target."""
    if not report["steered_ratios"]:
        return []
    s = report["settings"]
    layers = ", ".join(map(str, s["steering_layers"]))
    out = [(f"engine-run steered-N: engine-run again right after engine-run warm, over the same cache folders (its "
            "compile artefacts; warm only) and the same prompts, each record with a `steering` spec: N distinct "
            f"random vectors of the model's hidden size (seed {s['seed']}, norm about 1, .npy files in the run "
            "folder), "
            f"record i the (i mod N)-th, added at layer{'s' * (len(s['steering_layers']) > 1)} {layers} with coef 4 "
            "at all positions. hf-script is not run steered: the user's script has no steering."),
           ("Speed × unsteered: engine-run warm's time over the steered run's, for the whole command and for its "
            "generation phase (the same output tokens, so the steered run's speed as a share of plain's). The "
            f"target, on the whole command, is ≥ {STEERED_TARGET:.2f}× (steering costs at most "
            f"{round(100 * (1 - STEERED_TARGET))}%); the generation ratio is steering's cost without the start-up that "
            "dilutes it. Decode graphs, steered or not, are captured on first use, inside the generation phase.")]
    for name, ratio in report["steered_ratios"].items():
        if ratio is not None:
            verdict = "meets" if ratio["is_within_target"] else "misses"
            out.append(f"{name}: {ratio['whole_command']:.2f}× whole command, {ratio['generation']:.2f}× generation: "
                       f"{verdict} the ≥ {STEERED_TARGET:.2f}× whole-command target.")
    return out


def write_e2e_chart(report: dict, path) -> None:
    """One stacked bar per command: its phases, end to end, with its first result marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axis = plt.subplots(figsize=(11, 0.5 * len(runs) + 2.0))
    for y, m in enumerate(runs):
        left = 0.0
        for phase, color in zip(PHASES, COLORS):
            width = m["phases_s"][phase] or 0.0
            axis.barh(y, width, left=left, color=color, label=phase if y == 0 else None)
            left += width
        axis.plot([m["time_to_first_result_s"]], [y], marker="|", markersize=14, color="black",
                  label="first result" if y == 0 else None)
        axis.text(left, y, f" {m['wall_s']:.1f} s", va="center")
    axis.set_yticks(range(len(runs)), [m["label"] for m in runs])
    axis.invert_yaxis()
    axis.set_xlim(0, 1.12 * max(m["wall_s"] for m in runs))  # room for the totals
    axis.set_xlabel("seconds from the command's start")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(PHASES) + 1, fontsize="small",
                frameon=False)
    fig.suptitle(f"{report['workload']['name']}, whole command: {report['settings']['model']} on "
                 f"{report['card']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
