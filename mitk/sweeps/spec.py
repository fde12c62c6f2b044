"""What a patching sweep computes: one frozen, validated spec, read from flags or a YAML/JSON file.

Everything that changes the numbers is in the spec and in its fingerprint, so a
restart with a different spec is refused instead of mixing two sweeps in one
output. Execution details (device, device map, memory budget) are left out of
the fingerprint: they change how fast a unit runs, not what it computes.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cache
import hashlib
import inspect
import itertools
import json
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch

from mitk.analysis.patching import ALL_GRANULARITIES, SITES
from mitk.config.field_types import describe, matches
from mitk.errors import ConfigError, InputFileError, UnknownHookError
from mitk.sweeps.reading import read_text, short_repr

METRICS = ("logit_diff", "logit", "prob", "log_prob", "kl_to_clean")
ALIGNMENTS = ("none", "left-pad", "right-pad")
DIRECTIONS = ("denoising", "noising")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Fields that say where and how fast the sweep runs, not what it computes.
EXECUTION_FIELDS = ("device", "device_map", "memory_budget_mb")
LIST_FIELDS = ("pairs", "sites", "per")
MAX_SPEC_BYTES = 16 << 20
"""Largest spec file read (16 MiB); prompt pairs in bulk belong in a pairs file."""


class SpecFieldError(ConfigError):
    """A spec field has a value of the wrong type or out of range; ``field`` is its key path."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


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
        """Normalise list fields to tuples and refuse values no sweep can run with.

        ``SpecFieldError`` (a ``ConfigError``) names the field, and the item of a list.
        """
        for name in ("sites", "per"):  # one site may be given as a bare string
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        _check_types(self)
        for name in LIST_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.layers is not None:  # numpy integers too, as plain ints for JSON
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if (self.pairs_file is None) == (not self.pairs):
            raise ConfigError("give prompt pairs either inline (pairs) or as a file (pairs_file)")
        _choice("metric", self.metric, METRICS)
        _choice("direction", self.direction, DIRECTIONS)
        _choice("align", self.align, ALIGNMENTS)
        _choice("dtype", self.dtype, DTYPES)
        if (problem := device_problem(self.device, available=False)) is not None:
            raise SpecFieldError("device", f"device: {problem}")
        if self.device_map not in (None, "auto"):
            raise SpecFieldError(
                "device_map", f"device_map must be 'auto' or unset, got {self.device_map!r}"
            )
        for name in ("batch_size", "memory_budget_mb"):
            if getattr(self, name) < 1:
                raise SpecFieldError(name, f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.sites:
            raise SpecFieldError("sites", "sites: give at least one patching site")
        for per in self.per:
            _choice("per", per, ALL_GRANULARITIES)
        self.grid()  # validates every site name and (site, per) combination

    def grid(self) -> list[tuple[str, str]]:
        """The (site, granularity) pairs swept, in order; ``ConfigError`` naming a bad one."""
        cells: list[tuple[str, str]] = []
        for entry in self.sites:
            site, _, pinned = entry.partition(":")
            if site not in SITES:
                unknown = UnknownHookError(site, SITES, "patching site")
                raise SpecFieldError("sites", f"sites: {unknown}")
            supported = SITES[site].granularities()
            for per in [pinned] if pinned else self.per:
                _choice(f"granularity of site {site!r}", per, supported, field="sites")
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
    def from_dict(
        cls,
        values: Mapping[str, Any],
        source: str = "spec",
        places: Mapping[str, str] | None = None,
    ) -> SweepSpec:
        """Build from a dict, naming where each bad field came from in every error.

        ``places`` maps a key path (``layers``, ``layers[0]``) to where it was given,
        e.g. ``spec.yaml:3``; other fields are said to come from ``source``.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: a spec is a mapping of field: value, "
                              f"got {short_repr(values)}")  # fmt: skip
        known = {f.name for f in fields(cls)}
        given = places or {}

        def place(path: str) -> str:
            return given.get(path) or given.get(path.partition("[")[0]) or source

        for key in values:
            if key not in known:
                unknown = UnknownHookError(str(key), known, "spec field")
                raise ConfigError(f"{place(str(key))}: {unknown}")
        try:
            return cls(**values)
        except SpecFieldError as err:
            raise ConfigError(f"{place(err.field)}: {err}") from err
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


def _choice(name: str, value: Any, choices: tuple[str, ...], field: str | None = None) -> None:
    if value not in choices:
        message = f"{name} must be one of {', '.join(choices)}; got {short_repr(value)}"
        raise SpecFieldError(field or name, message)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_problem(text: str, available: bool = True) -> str | None:
    """Why ``text`` is no device to run on (None when it is one).

    ``available``: also require this machine to have it (a spec written on a GPU
    machine is still read, e.g. to merge its results, where there is none).
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"{short_repr(text)} is not a torch device (e.g. cpu, cuda, cuda:1)"
    if device.type not in DEVICE_TYPES:
        return f"{short_repr(text)}: mitk runs on {', '.join(DEVICE_TYPES)}"
    if not available or device.type == "cpu":
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "no MPS device is available"
    count = torch.cuda.device_count()
    if count == 0:
        return f"{short_repr(text)}: no CUDA device is available"
    if device.index is not None and device.index >= count:
        return f"{short_repr(text)}: this machine has {count} CUDA device(s)"
    return None


@cache
def _hints() -> dict[str, Any]:
    return get_type_hints(SweepSpec)


def _check_types(spec: SweepSpec) -> None:
    """``SpecFieldError`` for a field (or list item) of the wrong type, e.g. ``layers: [a]``."""
    for name, hint in _hints().items():
        value = getattr(spec, name)
        if matches(value, hint):
            continue
        lists = [a for a in (hint, *get_args(hint)) if get_origin(a) in (tuple, list)]
        if isinstance(value, (list, tuple)) and lists:  # name the first wrong item
            item_hint = get_args(lists[0])[0]
            for index, item in enumerate(value):
                if not matches(item, item_hint):
                    path = f"{name}[{index}]"
                    wrong = f"expected {describe(item_hint)}, got {short_repr(item)}"
                    raise SpecFieldError(path, f"{path}: {wrong}")
        raise SpecFieldError(name, f"{name}: expected {describe(hint)}, got {short_repr(value)}")


@dataclass(frozen=True)
class SpecFile:
    """A spec file's mapping, and the line each key (and list item) is on."""

    path: Path
    values: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)
    """Key path (``layers``, ``layers[0]``) -> 1-based line number."""

    def places(self) -> dict[str, str]:
        """Key path -> ``file:line``, for ``SweepSpec.from_dict``."""
        return {key: f"{self.path}:{line}" for key, line in self.lines.items()}


def load_spec_file(path: Path) -> SpecFile:
    """Parse a YAML (safe: no object tags) or JSON spec file, keeping each key's line.

    ``InputFileError`` naming the file, and the line and column of a syntax error;
    ``FileNotFoundError`` if there is no such file.
    """
    import yaml  # JSON is YAML too, so one parser reads both

    text = read_text(path, "spec file", MAX_SPEC_BYTES)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        values = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = err.problem or err.context or "unreadable"
        raise InputFileError(f"{where}: not valid YAML/JSON: {problem}") from err
    except yaml.YAMLError as err:  # e.g. a control character, at a position, not a line
        problem = str(err).splitlines()[0]
        raise InputFileError(f"{path}: not valid YAML/JSON: {problem}") from err
    except RecursionError:
        raise InputFileError(f"{path}: nested too deeply to be a spec") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise InputFileError(f"{path}: not a usable YAML/JSON value: {err}") from err
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(values, dict):
        raise InputFileError(f"{path}: a spec file holds one mapping of field: value, "
                             f"not {short_repr(values)}")  # fmt: skip
    return SpecFile(path, values, _key_lines(node))


def _key_lines(node: Any, max_items: int = 10_000) -> dict[str, int]:
    """Line of each top-level key of a composed YAML mapping, and of its list's items."""
    import yaml

    lines: dict[str, int] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        lines[str(key.value)] = key.start_mark.line + 1
        if isinstance(value, yaml.SequenceNode):
            for index, item in enumerate(value.value[:max_items]):
                lines[f"{key.value}[{index}]"] = item.start_mark.line + 1
    return lines


def read_spec_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON spec file (``load_spec_file`` keeps the lines too)."""
    return load_spec_file(path).values


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


__all__ = [
    "ALIGNMENTS",
    "METRICS",
    "SpecFieldError",
    "SpecFile",
    "SweepSpec",
    "device_problem",
    "field_help",
    "load_spec_file",
    "read_spec_file",
]
