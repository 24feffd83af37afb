"""The light workers stay light: tokenizer and decoder workers import neither torch nor transformers, `import engine`
imports no torch, and a spawned child does not re-run the parent's __main__."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import PROMPTS, tiny_config

from engine import Engine, EngineError
from engine.config import CaptureDefaults
from engine.procs import CHECK_IMPORTS_ENV, check_light_imports

ROOT = Path(__file__).resolve().parents[2]


def test_spawned_tokenizer_and_decoder_workers_import_neither_torch_nor_transformers(monkeypatch):
    # Each worker checks its own sys.modules after loading its tokenizer and after every batch, and fails the run
    # (a fatal message, an EngineError here) if it finds torch or transformers.
    monkeypatch.setenv(CHECK_IMPORTS_ENV, "1")
    config = tiny_config(max_num_seqs=4, tokenizer_workers=2, decoder_workers=2,
                         capture=CaptureDefaults(layers=[1], positions="generated"))
    records = [{"id": f"p{i}", "prompt": p, "max_new_tokens": 6} for i, p in enumerate(PROMPTS)]
    records.append({"id": "stop", "prompt": PROMPTS[0], "max_new_tokens": 8, "stop": ["e"]})  # the decoders' cut
    records.append({"id": "chat", "messages": [{"role": "user", "content": "hi"}]})  # the chat path (an error here)
    with Engine(config) as engine:
        got = {r["id"]: r for r in engine.generate_all(records)}
    assert all("error" not in got[f"p{i}"] for i in range(len(PROMPTS)))
    assert all("activations" in got[f"p{i}"] for i in range(len(PROMPTS)))
    assert "chat template" in got["chat"]["error"]


def test_the_import_check_fails_a_worker_that_imported_torch():
    import torch  # noqa: F401 - this process has it (the tests import it), as a worker that strayed would

    with pytest.raises(RuntimeError, match="the decoder worker imported torch"):
        check_light_imports("decoder worker")


def test_a_worker_that_imports_torch_fails_the_engine(monkeypatch, tmp_path):
    # Every new interpreter imports torch first (a sitecustomize), as a worker would after someone added a heavy
    # import: the run must fail, naming the stage.
    (tmp_path / "sitecustomize.py").write_text("import torch\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(CHECK_IMPORTS_ENV, "1")
    failed = r"(tokenizer|decoder) worker \d failed: RuntimeError: the (tokenizer|decoder) worker imported torch"
    with pytest.raises(EngineError, match=failed), Engine(tiny_config()) as engine:
        engine.generate_all([{"id": "a", "prompt": PROMPTS[0], "max_new_tokens": 2}])


def test_importing_the_package_imports_no_torch():
    script = ("import engine, sys; assert 'torch' not in sys.modules and 'engine.engine' not in sys.modules; "
              "assert engine.EngineConfig.__module__ == 'engine.config' and 'torch' not in sys.modules; "
              "assert engine.Engine.__module__ == 'engine.engine' and 'Engine' in dir(engine)")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)


MAIN_SCRIPT = """
    import sys
    import threading
    import multiprocessing as mp
    from pathlib import Path

    with open(Path(sys.argv[1]), "a") as f:  # a side effect of running this module, once per run of it
        f.write("ran\\n")

    def in_main(events):
        from probe_target import Facts

        events.put(Facts({"in_main": True}))

    if __name__ == "__main__":
        from engine.procs import MsgQueue, start
        from probe_target import report

        ctx = mp.get_context("spawn")
        events = MsgQueue(ctx)
        started = []
        thread = threading.Thread(target=lambda: started.append(start(ctx, "probe", events, report, events)))
        thread.start()
        thread.join()
        started[0].join(60)
        print(events.get(timeout=10).facts)
        proc = start(ctx, "probe main", events, in_main, events)  # a target in __main__ still gets it
        proc.join(60)
        print(events.get(timeout=10).facts)
"""
TARGET = """
import sys
from dataclasses import dataclass

from engine.messages import Message, message


@message(200)
@dataclass(slots=True)
class Facts(Message):
    facts: dict


def report(events):
    events.put(Facts({"is_main_rerun": hasattr(sys.modules["__main__"], "in_main"), "torch": "torch" in sys.modules,
                      "main_file": getattr(sys.modules["__main__"], "__file__", None)}))
"""


@pytest.mark.parametrize("how", ["path", "module"])
def test_a_child_started_from_a_script_does_not_rerun_it(tmp_path, how):
    (tmp_path / "probe_main.py").write_text(textwrap.dedent(MAIN_SCRIPT))
    (tmp_path / "probe_target.py").write_text(TARGET)
    marker = tmp_path / "marker.txt"
    command = [str(tmp_path / "probe_main.py")] if how == "path" else ["-m", "probe_main"]
    done = subprocess.run([sys.executable, *command, str(marker)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == "{'is_main_rerun': False, 'torch': False, 'main_file': None}"
    assert second == "{'in_main': True}"
    assert marker.read_text() == "ran\n" * 2  # the parent, and the child whose target lives in __main__


BYTECODE_SCRIPT = """
import os, sys
import engine.bytecode as bytecode
bytecode.PACKAGES = ("heavy",)
bytecode.use_bytecode_cache()
import heavy
import multiprocessing as mp
import probe
if __name__ == "__main__":
    child = mp.get_context("spawn").Process(target=probe.stage)  # an engine stage: spawned, as run_child starts
    child.start()
    child.join()
    print(sys.pycache_prefix or "")
"""
PROBE = """
def stage():
    from engine.bytecode import use_bytecode_cache
    use_bytecode_cache()  # what run_child does first
    import heavy_child
"""


@pytest.mark.parametrize("opt_out", [False, True])
def test_bytecode_of_a_package_without_it_is_kept_in_the_cache_dir_even_under_dontwritebytecode(tmp_path, opt_out):
    # PYTHONDONTWRITEBYTECODE (as container images often set) made every start compile torch and transformers from
    # source; the engine keeps their bytecode under its cache dir instead, never in the install, unless told not to.
    site = tmp_path / "site"
    for name in ("heavy", "heavy_child"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("VALUE = 1\n")
    (site / "probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", PYTHONDONTWRITEBYTECODE="1",
               ENGINE_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("PYTHONPYCACHEPREFIX", None)
    if opt_out:
        env["ENGINE_BYTECODE_CACHE"] = "0"
    (tmp_path / "script.py").write_text(BYTECODE_SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "script.py")], env=env, capture_output=True, text=True,
                         check=True)
    written = sorted(p.parent.name for p in (tmp_path / "cache").rglob("__init__*.pyc") if "heavy" in str(p))
    assert not list(site.rglob("*.pyc"))  # the install is never written
    if opt_out:
        assert out.stdout.strip() == "" and written == []
    else:
        assert out.stdout.strip() == str(tmp_path / "cache" / "pycache")
        assert written == ["heavy", "heavy_child"]


SKLEARN_SCRIPT = """
import sys
import engine.core.hf_imports
if sys.argv[1] == "core":
    engine.core.hf_imports.skip_unused_imports()  # what run_core does before loading the model
from transformers import AutoModelForCausalLM  # noqa: F401
import transformers.generation.candidate_generator  # noqa: F401
import transformers.utils
import transformers.loss.loss_utils  # noqa: F401
print(transformers.utils.is_sklearn_available(), transformers.utils.is_scipy_available(),
      "sklearn" in sys.modules or "scipy" in sys.modules)
"""


@pytest.mark.parametrize("process", ["core", "plain"])
def test_an_engine_core_tells_transformers_scikit_learn_and_scipy_are_absent(tmp_path, process):
    # transformers 5.17 imports scikit-learn (with scipy and pandas, ~3 s) for assisted generation and
    # scipy.optimize for detection losses, neither of which a core runs; a plain process keeps transformers as it
    # is. Stand-ins make both "installed" here.
    for package, module, name in (("sklearn", "metrics", "roc_curve"), ("scipy", "optimize", "linear_sum_assignment")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / f"{module}.py").write_text(f"def {name}(*args):\n    raise NotImplementedError\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    out = subprocess.run([sys.executable, "-c", SKLEARN_SCRIPT, process], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split()[:2] == (["False", "False"] if process == "core" else ["True", "True"])
    if process == "core":
        assert out.stdout.split()[2] == "False"


def test_the_installed_distributions_are_read_from_a_record_that_follows_the_installs(tmp_path, monkeypatch):
    # transformers 5.17 calls importlib.metadata.packages_distributions() on import (0.6 s on a GPU host with many
    # packages); a core answers it from a record keyed by sys.path and its folders' times: the same map, and a new
    # install (a new .dist-info folder) makes a new record.
    import importlib.metadata

    from engine.core.hf_imports import distributions_from

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    real = importlib.metadata.packages_distributions
    want = {name: list(dists) for name, dists in real().items()}
    with distributions_from(str(tmp_path / "cache")):
        assert importlib.metadata.packages_distributions() == want
    assert importlib.metadata.packages_distributions is real  # restored after the block
    [record] = (tmp_path / "cache" / "python-distributions").iterdir()
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {"computed": ["again"]})
    with distributions_from(str(tmp_path / "cache")):
        assert importlib.metadata.packages_distributions() == want  # from the record, not computed
    time.sleep(0.01)
    (site / "newpkg-1.0.dist-info").mkdir()  # an install into a folder on sys.path changes the folder's time
    with distributions_from(str(tmp_path / "cache")):
        assert importlib.metadata.packages_distributions() == {"computed": ["again"]}
    assert len(list((tmp_path / "cache" / "python-distributions").iterdir())) == 2 and record.exists()


def test_a_stage_failing_with_a_user_error_reports_its_message_and_no_traceback(tmp_path):
    """A bad model directory found in a stage (as a core finds an unrunnable model) reaches the parent as its one
    line; any other exception keeps the traceback that helps to fix it."""
    import multiprocessing

    from engine.messages import Fatal
    from engine.models import resolve_model
    from engine.procs import MsgQueue, start

    ctx = multiprocessing.get_context("spawn")
    events = MsgQueue(ctx)
    missing = tmp_path / "no-model"
    start(ctx, "probe", events, resolve_model, str(missing), None, str(tmp_path)).join(60)
    fatal = events.get(timeout=10)
    assert isinstance(fatal, Fatal) and fatal.traceback == "", fatal
    assert fatal.error.startswith(f"--model {missing}") and "\n" not in fatal.error, fatal.error
    start(ctx, "probe", events, int, "not a number").join(60)
    fatal = events.get(timeout=10)
    assert fatal.error.startswith("ValueError: invalid literal") and "Traceback" in fatal.traceback, fatal
