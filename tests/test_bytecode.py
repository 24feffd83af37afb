"""The bytecode pool: what it compiles, where it writes, and that it stays away from an install that has bytecode."""

import os
import subprocess
import sys
from pathlib import Path

from engine.bytecode import _walk

ROOT = str(Path(__file__).resolve().parents[1])


def _package(site: Path, name: str, modules: dict[str, str]) -> None:
    for rel, text in modules.items():
        path = site / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_walk_skips_test_suites_and_transformers_model_folders_but_auto(tmp_path):
    _package(tmp_path, "transformers", {"__init__.py": "", "utils/hub.py": "", "tests/test_x.py": "",
                                        "models/__init__.py": "", "models/auto/modeling_auto.py": "",
                                        "models/llama/modeling_llama.py": "", "__pycache__/x.py": ""})
    found = [os.path.relpath(p, tmp_path) for p in _walk(str(tmp_path / "transformers"), "transformers")]
    assert found == ["transformers/__init__.py", "transformers/models/__init__.py",
                     "transformers/models/auto/modeling_auto.py", "transformers/utils/hub.py"]
    _package(tmp_path, "other", {"__init__.py": "", "models/llama/m.py": ""})  # the model rule is transformers'
    assert len(_walk(str(tmp_path / "other"), "other")) == 2


POOL = """
import sys
import engine.bytecode as bytecode
procs = bytecode.precompile(("first", "second"), workers=2)
for proc in procs:
    proc.wait()
print(len(procs), len(bytecode.precompile(("first", "second"), workers=2)))
"""


def test_the_pool_compiles_every_module_under_the_prefix_once_and_leaves_the_install_alone(tmp_path):
    site, prefix = tmp_path / "site", tmp_path / "prefix"
    _package(site, "first", {"__init__.py": "A = 1\n", "sub/__init__.py": "", "sub/mod.py": "B = 2\n",
                             "broken.py": "def (:\n", "tests/test_first.py": ""})
    _package(site, "second", {"__init__.py": ""})
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", PYTHONPYCACHEPREFIX=str(prefix))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run([sys.executable, "-c", POOL], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "0"]  # the second call finds the first package's bytecode and starts none
    written = sorted(str(p.relative_to(prefix)).split(f"{site.name}/", 1)[1] for p in prefix.rglob("*.pyc")
                     if str(site) in str(p))  # Python itself wrote the engine's and the standard library's
    tag = sys.implementation.cache_tag
    assert written == [f"first/__init__.{tag}.pyc", f"first/sub/__init__.{tag}.pyc", f"first/sub/mod.{tag}.pyc",
                       f"second/__init__.{tag}.pyc"]  # the broken module is left to the import that needs it
    assert not list(site.rglob("*.pyc"))
    used = subprocess.run([sys.executable, "-B", "-v", "-c", "import first.sub.mod as m; print(m.B)"], env=env,
                          capture_output=True, text=True, check=True)  # -v: where each module's code came from
    assert used.stdout.split() == ["2"]
    assert f"code object from '{prefix}{site}/first/sub/mod.{tag}.pyc'" in used.stderr
