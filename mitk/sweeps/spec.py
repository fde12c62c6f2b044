"""What a patching sweep computes: one frozen, validated spec, read from flags or a YAML/JSON file.

Everything that changes the numbers is in the spec and in its fingerprint, so a
restart with a different spec is refused instead of mixing two sweeps in one
output. Execution details (device, device map, memory budget) are left out of
the fingerprint: they change how fast a unit runs, not what it computes.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, fields
import hashlib
import inspect
import itertools
import json
from pathlib import Path
from typing import Any

from mitk.analysis.patching import ALL_GRANULARITIES, SITES
from mitk.errors import ConfigError, UnknownHookError

METRICS = ("logit_diff", "logit", "prob", "log_prob", "kl_to_clean")
ALIGNMENTS = ("none", "left-pad", "right-pad")
DIRECTIONS = ("denoising", "noising")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Fields that say where and how fast the sweep runs, not what it computes.
EXECUTION_FIELDS = ("device", "device_map", "memory_budget_mb")


@dataclass(frozen=True)
class SweepSpec:
    """A patching sweep: model, prompt pairs, (site, granularity) grid, metric and batching."""

    model: str = "toy-induction"
    """Embedded model name (see `mitk models`) or a local model directory."""
    pairs_file: str | None = None
    """JSONL or CSV file of prompt pairs: clean, corrupted, answer, wrong_answer columns."""
    pairs: tuple[dict[str, Any], ...] = ()
    """Inline prompt pairs (objects with the same fields as a pairs file's rows)."""
    sites: tuple[str, ...] = ("resid_pre",)
    """Patching sites (resid_pre, z, ...); 'site:per' pins one granularity to a site."""
    per: tuple[str, ...] = ("layer",)
    """Granularities swept for every site not pinned with 'site:per': layer, pos, head, head_pos."""
    metric: str = "logit_diff"
    """Metric at each prompt's answer position: logit_diff, logit, prob, log_prob, kl_to_clean."""
    direction: str = "denoising"
    """denoising patches clean activations into the corrupted run; noising the reverse."""
    layers: tuple[int, ...] | None = None
    """Layers to patch (default: all)."""
    align: str = "none"
    """How prompts of different lengths line up: none (an error), left-pad or right-pad."""
    batch_size: int = 16
    """Prompt pairs per work unit; fixes the chunk boundaries that resuming and sharding use."""
    memory_budget_mb: int = 2048
    """Bound on the activations of one batched patching forward, in MiB."""
    dtype: str = "float32"
    """Weights and activations dtype: float32, float64, float16 or bfloat16."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda:0 (ignored with device_map)."""
    device_map: str | None = None
    """'auto': spread whole blocks over the visible GPUs (Hugging Face accelerate)."""

    def __post_init__(self) -> None:
        """Normalise list fields to tuples and refuse values no sweep can run with."""
        for name in ("pairs", "sites", "per"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if (self.pairs_file is None) == (not self.pairs):
            raise ConfigError("give prompt pairs either inline (pairs) or as a file (pairs_file)")
        _choice("metric", self.metric, METRICS)
        _choice("direction", self.direction, DIRECTIONS)
        _choice("align", self.align, ALIGNMENTS)
        _choice("dtype", self.dtype, DTYPES)
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"device_map must be 'auto' or unset, got {self.device_map!r}")
        for name in ("batch_size", "memory_budget_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.sites:
            raise ConfigError("sites: give at least one patching site")
        for per in self.per:
            _choice("per", per, ALL_GRANULARITIES)
        self.grid()  # validates every site name and (site, per) combination

    def grid(self) -> list[tuple[str, str]]:
        """The (site, granularity) pairs swept, in order; ``ConfigError`` naming a bad one."""
        cells: list[tuple[str, str]] = []
        for entry in self.sites:
            site, _, pinned = entry.partition(":")
            if site not in SITES:
                raise ConfigError(f"sites: {UnknownHookError(site, SITES, 'patching site')}")
            supported = SITES[site].granularities()
            for per in [pinned] if pinned else self.per:
                _choice(f"granularity of site {site!r}", per, supported)
                if (site, per) not in cells:
                    cells.append((site, per))
        return cells

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        """JSON text that ``from_json`` reads back into an equal spec."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "spec") -> SweepSpec:
        """Build from a dict, naming ``source`` and the field in every error."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: {UnknownHookError(key, known, 'spec field')}")
        try:
            return cls(**values)
        except TypeError as err:  # e.g. a number where a list belongs
            raise ConfigError(f"{source}: {err}") from err
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err

    @classmethod
    def from_json(cls, text: str) -> SweepSpec:
        """Inverse of ``to_json``."""
        return cls.from_dict(json.loads(text))

    def fingerprint(self, pairs_digest: str, model_digest: str) -> str:
        """Hash of everything that changes the results: this spec, the pairs and the model."""
        what = {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}
        what["pairs_file"] = None  # the pairs' content counts, not where the file lives
        blob = json.dumps([what, pairs_digest, model_digest], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def read_spec_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (``safe_load``: no object tags) or JSON spec file."""
    import yaml  # JSON is YAML too, so one parser reads both

    text = path.read_text()
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML/JSON: {getattr(err, 'problem', err)}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a spec file holds one mapping of field: value")
    return values


def field_help() -> dict[str, str]:
    """Each spec field's docstring (the line under it), for the command's --help."""
    tree = ast.parse(inspect.getsource(SweepSpec))
    body = tree.body[0].body  # type: ignore[attr-defined]
    helps: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            helps[node.target.id] = str(following.value.value).strip()
    return helps


__all__ = ["ALIGNMENTS", "METRICS", "SweepSpec", "field_help", "read_spec_file"]
