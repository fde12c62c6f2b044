"""``import mitk`` reaches every subpackage as an attribute, and loads the heavy ones only on use.

Each check runs in a fresh interpreter: in this process other tests have
already imported the submodules, which would hide a missing lazy import.
"""

from __future__ import annotations

import json
import subprocess
import sys


def fresh_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_attribute_chains_work_after_a_bare_import() -> None:
    out = fresh_python(
        "import mitk\n"
        "print(mitk.analysis.dla.logit_attribution.__name__)\n"
        "print(mitk.sae.train.__name__)\n"
        "print(mitk.sweeps.run_sweep.__name__)\n"
    )
    assert out.split() == ["logit_attribution", "train", "run_sweep"]


SUBPACKAGES = [
    "analysis",
    "atomic",
    "cache",
    "checkpoint",
    "config",
    "errors",
    "hooks",
    "model",
    "sae",
    "sequences",
    "shapes",
    "sweeps",
    "train",
    "utils",
    "viz",
]


def test_every_subpackage_is_an_attribute_and_listed() -> None:
    out = fresh_python(
        "import mitk\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    print(getattr(mitk, name).__name__, name in dir(mitk))\n"
    )
    assert out.split() == [word for n in SUBPACKAGES for word in (f"mitk.{n}", "True")]


def test_every_analysis_is_an_attribute() -> None:
    names = ["circuits", "composition", "detectors", "dla", "lens", "patching"]
    out = fresh_python(
        "import mitk\n"
        f"for name in {names!r}:\n"
        "    print(getattr(mitk.analysis, name).__name__, name in dir(mitk.analysis))\n"
    )
    assert out.split() == [word for n in names for word in (f"mitk.analysis.{n}", "True")]


def test_import_mitk_loads_no_sae_plots_or_sweeps_and_unknown_names_raise() -> None:
    out = fresh_python(
        "import json, sys, mitk\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('mitk', 'plotly'))))\n"
        "for owner in (mitk, mitk.analysis):\n"
        "    try:\n"
        "        owner.no_such_thing\n"
        "    except AttributeError as err:\n"
        "        print(type(err).__name__)\n"
    )
    first, *rest = out.splitlines()
    loaded = set(json.loads(first))
    assert not loaded & {"mitk.sae", "mitk.viz", "mitk.sweeps", "mitk.analysis", "plotly"}
    assert rest == ["AttributeError", "AttributeError"]
