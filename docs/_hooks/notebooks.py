"""MkDocs hooks: run the notebooks in a private kernel and render their plotly figures offline.

mkdocs-jupyter executes ``notebooks/*.ipynb`` at build time. The kernel it starts is
this interpreter (a private kernel spec, so a ``python3`` spec elsewhere on the machine
cannot be picked), runs in a scratch directory (anything a notebook writes stays out of
the repository) and shows plotly figures as HTML calling the one plotly.js the site
carries (``assets/plotly.min.js``, copied from the installed plotly; notebook pages load
it in their head, ``docs/_theme/main.html``), so no page needs a CDN.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import sys
import tempfile
from typing import Any

import plotly

KERNEL = "mitk-docs"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
PLOTLY_ASSET = "assets/plotly.min.js"

KERNEL_STARTUP = Path(__file__).with_name("kernel_startup.py")

_scratch = tempfile.TemporaryDirectory(prefix="mitk-docs-")


def on_config(config: Any) -> Any:
    """Install the private kernel spec and point Jupyter's and IPython's files at scratch."""
    root = Path(_scratch.name)
    spec_dir = root / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [
            sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            f"--IPKernelApp.exec_files={KERNEL_STARTUP}",
        ],
        "display_name": "mitk docs",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = str(root / "jupyter")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")
    os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
    os.environ["IPYTHONDIR"] = str(root / "ipython")
    # the embedded models are tiny: a second thread only adds synchronisation
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return config


def on_files(files: Any, config: Any) -> Any:
    """Add the installed plotly.js to the site, as the one copy every figure uses."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PLOTLY_ASSET, abs_src_path=str(PLOTLY_JS)))
    return files
