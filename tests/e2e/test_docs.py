"""The documentation's code is real: every python block runs, and the hook table is the model's.

Each page's python blocks run in order in one namespace (a page is one session), in a
scratch directory. A block whose first line is ``# not run: <why>`` is shown, not run:
the reader sees why on the page too. ``mkdocs build --strict`` (``make docs``) checks
links and references; these tests check what the build cannot: that the code works.
"""

from __future__ import annotations

from collections.abc import Iterator
import itertools
from pathlib import Path
import re
from typing import Any

import pytest
import torch
import typer

from mitk import HookedTransformer
from mitk.cli import app
from mitk.config import TransformerConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
NOT_RUN = "# not run:"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
HOOK_TABLE_MARKER = "<!-- hook table: checked by tests/e2e/test_docs.py -->"
API_PACKAGES = ("model", "hooks", "cache", "analysis", "sae", "viz", "train", "cli")


def python_blocks(path: Path) -> list[str]:
    """The page's python blocks that are meant to run, in order."""
    blocks = BLOCK.findall(path.read_text())
    return [block for block in blocks if not block.startswith(NOT_RUN)]


def _pages_with_code() -> Iterator[Path]:
    yield ROOT / "README.md"
    yield from (page for page in PAGES if python_blocks(page))


@pytest.mark.slow
@pytest.mark.parametrize("page", list(_pages_with_code()), ids=lambda page: page.stem)
def test_the_python_blocks_of_a_page_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # whatever the examples write lands here
    torch.set_num_threads(1)  # the embedded models are tiny: one thread is fastest
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for index, block in enumerate(python_blocks(page)):
        code = compile(block, f"{page.name}, python block {index}", "exec")
        exec(code, namespace)


def test_blocks_that_do_not_run_say_why() -> None:
    for page in [ROOT / "README.md", *PAGES]:
        for block in BLOCK.findall(page.read_text()):
            if block.startswith(NOT_RUN):
                reason = block.splitlines()[0].removeprefix(NOT_RUN).strip()
                assert reason, f"{page.name}: a block marked '{NOT_RUN}' gives no reason"


# --- shell commands: the docs run no shell, but every command they show must exist ----------


def shell_lines(path: Path) -> list[str]:
    """The commands of a page's bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in SHELL_BLOCK.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _check_mitk_command(words: list[str], where: str) -> None:
    """Each subcommand and ``--option`` of a ``mitk ...`` line names one the CLI has."""
    command = typer.main.get_command(app)  # typer's own click: subcommands in .commands
    known = _options(command) | {"--help"}
    for word in words:
        option = word.split("=", 1)[0]
        if option.startswith("--"):
            assert option in known, f"{where}: `{' '.join(words)}`: no option {option}"
        elif word in getattr(command, "commands", {}):
            command = command.commands[word]
            known = _options(command) | {"--help"}


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda page: page.stem)
def test_the_commands_a_page_shows_exist(page: Path) -> None:
    for line in shell_lines(page):
        words = line.split()
        if "mitk" in words:  # mitk ..., torchrun ... -m mitk ...
            _check_mitk_command(words[words.index("mitk") + 1 :], page.name)
        scripts = [word for word in words if word.endswith(".py") and "/" in word]
        for script in scripts:  # bench/forward.py and the like, relative to the repository
            if not script.startswith(("~", "/")):
                assert (ROOT / script).exists(), f"{page.name}: `{line}`: no {script}"


# --- the hook table on the concepts page ----------------------------------------------

_SIZES = {"d_model": 24, "n_heads": 6, "d_head": 4, "d_mlp": 40, "d_vocab": 50, "n_ctx": 16}
_BATCH, _POS, _KV_HEADS = 2, 7, 3
GPT2_STYLE = TransformerConfig(**_SIZES, n_layers=2)
LLAMA_STYLE = TransformerConfig(
    **_SIZES,
    n_layers=2,
    n_key_value_heads=_KV_HEADS,
    positional="rotary",
    normalization="rmsnorm",
    gated_mlp=True,
    act_fn="silu",
    architecture="llama",
)
_AXES = {
    _BATCH: "batch",
    _POS: "pos",
    _SIZES["d_model"]: "d_model",
    _SIZES["n_heads"]: "head",
    _KV_HEADS: "kv_head",
    _SIZES["d_head"]: "d_head",
    _SIZES["d_mlp"]: "d_mlp",
    _SIZES["d_vocab"]: "d_vocab",
    1: "1",
}
WHAT = {
    "hook_embed": "token embeddings, the stream's first write",
    "hook_pos_embed": "position embeddings, added to the stream",
    "blocks.{L}.hook_resid_pre": "the residual stream entering block L",
    "blocks.{L}.ln1.hook_scale": "the norm's divisor before attention (LayerNorm or RMSNorm)",
    "blocks.{L}.ln1.hook_normalized": "the normalised stream, before the norm's weight",
    "blocks.{L}.attn.hook_q": "queries",
    "blocks.{L}.attn.hook_k": "keys (key-value heads under grouped-query attention)",
    "blocks.{L}.attn.hook_v": "values (key-value heads under grouped-query attention)",
    "blocks.{L}.attn.hook_rot_q": "queries after rotary",
    "blocks.{L}.attn.hook_rot_k": "keys after rotary",
    "blocks.{L}.attn.hook_attn_scores": "scores before the softmax (hooked: explicit path)",
    "blocks.{L}.attn.hook_pattern": "attention weights (hooked: explicit path)",
    "blocks.{L}.attn.hook_z": "each head's weighted values",
    "blocks.{L}.attn.hook_result": "each head's write to the stream, built from z and W_O",
    "blocks.{L}.hook_attn_out": "the attention layer's write",
    "blocks.{L}.hook_resid_mid": "the stream after attention",
    "blocks.{L}.ln2.hook_scale": "the norm's divisor before the MLP",
    "blocks.{L}.ln2.hook_normalized": "the normalised stream the MLP reads",
    "blocks.{L}.mlp.hook_pre": "pre-activations (the gate in a gated MLP)",
    "blocks.{L}.mlp.hook_pre_linear": "the gated MLP's linear branch",
    "blocks.{L}.mlp.hook_post": "neuron activations",
    "blocks.{L}.hook_mlp_out": "the MLP's write",
    "blocks.{L}.hook_resid_post": "the stream leaving block L",
    "ln_final.hook_scale": "the final norm's divisor",
    "ln_final.hook_normalized": "the normalised final stream",
    "unembed.hook_in": "what the unembedding reads",
    "unembed.hook_out": "the logits",
}


def _shapes(cfg: TransformerConfig) -> dict[str, str]:
    """Each hook of block 0 and the model (as ``blocks.{L}...``) with its symbolic shape."""
    model = HookedTransformer(cfg)
    tokens = torch.randint(0, cfg.d_vocab, (_BATCH, _POS))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda _: True)
    assert set(cache.keys()) == set(model.hook_dict)  # the table covers every hook point
    shapes = {}
    for hook, value in cache.items():
        if hook.startswith("blocks.") and not hook.startswith("blocks.0."):
            continue
        axes = [_AXES[size] for size in value.shape]
        if axes.count("pos") == 2:  # scores and patterns: [batch, head, query, key]
            axes[axes.index("pos")], axes[axes.index("pos")] = "query_pos", "key_pos"
        shapes[hook.replace("blocks.0.", "blocks.{L}.")] = f"[{', '.join(axes)}]"
    return shapes


def _in_model_order(gpt2: list[str], llama: list[str]) -> list[str]:
    """Both models' hooks, each LLaMA-only one right after the hook it follows there."""
    order = list(gpt2)
    for before, hook in itertools.pairwise(llama):
        if hook not in order:
            order.insert(order.index(before) + 1, hook)
    return order


def hook_table() -> str:
    """The concepts page's table, from a GPT-2-style and a LLaMA-style model's caches."""
    gpt2, llama = _shapes(GPT2_STYLE), _shapes(LLAMA_STYLE)
    only = {"hook_pos_embed": "learned or sinusoidal positions", "hook_pre_linear": "gated MLPs"}
    rows = ["| hook | shape | on | what it holds |", "|---|---|---|---|"]
    for hook in _in_model_order(list(gpt2), list(llama)):
        shape = f"`{gpt2.get(hook) or llama[hook]}`"
        if hook in gpt2 and hook in llama and gpt2[hook] != llama[hook]:
            shape += f"; GQA: `{llama[hook]}`"
        if hook in gpt2 and hook in llama:
            where = "every model"
        else:
            where = "rotary positions" if "hook_rot_" in hook else only[hook.split(".")[-1]]
        rows.append(f"| `{hook}` | {shape} | {where} | {WHAT[hook]} |")
    return "\n".join(rows)


def test_the_hook_table_is_the_models() -> None:
    text = (DOCS / "concepts.md").read_text()
    assert HOOK_TABLE_MARKER in text, f"docs/concepts.md lacks the marker {HOOK_TABLE_MARKER!r}"
    after = text.split(HOOK_TABLE_MARKER, 1)[1].lstrip("\n")
    match = re.match(r"((?:\|.*\|\n)+)", after)
    assert match, "no markdown table right after the hook-table marker in docs/concepts.md"
    expected = hook_table()
    assert match.group(1).strip() == expected, (
        f"docs/concepts.md's hook table should read:\n{expected}"
    )


# --- the site's structure -------------------------------------------------------------


def test_the_api_reference_has_a_page_per_public_package() -> None:
    for package in API_PACKAGES:
        page = DOCS / "api" / f"{package}.md"
        assert f"::: mitk.{package}" in page.read_text(), f"{page} does not render mitk.{package}"


def test_the_readme_links_to_pages_that_exist() -> None:
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links, "the README links to no documentation page"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing pages: {missing}"
