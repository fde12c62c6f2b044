"""The command line as a user runs it: subprocesses, exit codes, output."""

from __future__ import annotations

import json
import math
from pathlib import Path
import subprocess
import sys

import pytest


def run_mitk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mitk", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def text_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``mitk demo --json`` on the default model (shakespeare-small), run once for the module."""
    out = tmp_path_factory.mktemp("demo") / "report.html"
    done = run_mitk("demo", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), out


def test_demo_reports_on_real_text_by_default(text_demo: tuple[dict, Path]) -> None:
    result, out = text_demo
    assert result["model"] == "shakespeare-small"
    assert result["sections"][:3] == [
        "Direct logit attribution of a real next token",
        "Logit lens",
        "Attention patterns",
    ]
    for title in ("Name swap: patching the residual stream", "Sparse autoencoder features"):
        assert title in result["sections"]
    tokens = result["str_tokens"]  # labels are the prompt's real token strings
    assert tokens[0] == "<|bos|>" and "".join(tokens[1:]).startswith("VALENTINE.\nCease")
    dla = result["dla"]
    assert dla["answer"] == tokens[dla["position"] + 1] and any(c.isalpha() for c in dla["answer"])
    assert 0 < dla["probability"] <= 1 and len(dla["top"]) == 5
    page = out.read_text()
    assert "<script src=" not in page and page.count("Plotly.newPlot") >= 8
    assert "Cease" in page and "shakespeare-small" in page  # token labels reach the figures


def test_demo_name_swap_differs_in_one_word_and_measures_the_logit_difference(
    text_demo: tuple[dict, Path],
) -> None:
    swap = text_demo[0]["name_swap"]
    for clean, corrupted in zip(swap["clean"], swap["corrupted"], strict=True):
        differing = [a != b for a, b in zip(clean.split(), corrupted.split(), strict=True)]
        assert sum(differing) >= 1 and clean != corrupted
    diffs = swap["clean_logit_diff"] + swap["corrupted_logit_diff"]
    assert diffs and all(math.isfinite(d) for d in diffs)
    if swap["right"]:  # the pairs shown are ones the model gets right in both prompts
        assert all(d > 0 for d in swap["clean_logit_diff"])
        assert all(d < 0 for d in swap["corrupted_logit_diff"])
    recovery = [v for row in swap["by_head_normalized"] for v in row]
    assert recovery and all(math.isfinite(v) for v in recovery)


def test_demo_sae_lists_features_with_real_text_contexts(text_demo: tuple[dict, Path]) -> None:
    sae = text_demo[0]["sae"]
    assert 0 <= sae["fvu"] < 1 and sae["features"]
    for feature in sae["features"]:
        assert 0.001 <= feature["frequency"] <= 0.05 and feature["max_activation"] > 0
        assert feature["contexts"] and all("[[" in c and "]]" in c for c in feature["contexts"])
    words = " ".join(c for f in sae["features"] for c in f["contexts"])
    assert sum(ch.isalpha() for ch in words) > 50  # contexts are text, not token ids


def test_demo_human_output_on_a_prompt_of_ones_own(tmp_path: Path) -> None:
    prompt = "ROMEO.\nBut soft, what light through yonder window breaks?"
    done = run_mitk("demo", "--prompt", prompt, "--out", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    for line in ("model shakespeare-small", "name swap:", "SAE on blocks.", "report written to"):
        assert line in done.stdout


def test_demo_on_toy_induction_finds_induction(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    done = run_mitk("demo", "--model", "toy-induction", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # the repeated half is predictable only through an induction circuit
    assert result["loss_repeated_half"] < 0.1 * result["loss_first_half"]
    late = [row for row in result["predictions"] if row["pos"] > 20 and row["next"] is not None]
    assert late and all(row["top"][0][0] == row["next"] for row in late)
    assert "blocks.1.attn.hook_pattern" in result["cached"]
    heads = {h["label"]: h for h in result["heads"]}
    assert max(heads.values(), key=lambda h: h["induction"])["layer"] == 1
    assert max(heads.values(), key=lambda h: h["previous_token"])["layer"] == 0
    assert result["top_attributions"][0][0].startswith("L1H")  # induction heads write the answer
    low, spread = result["k_composition_baseline"]
    assert result["k_composition_max"] > low + 5 * spread  # the circuit's K-composition
    recovery = result["patching_normalized"]  # [layer, head]
    assert max(recovery[1]) > max(recovery[0])  # layer-1 heads carry the answer
    page = out.read_text()
    assert result["report"] == str(out)
    assert "<script src=" not in page  # plotly.js is inlined: renders with no network
    assert page.count("Plotly.newPlot") >= 5 and "toy-induction" in page


def test_demo_human_output_on_toy_induction(tmp_path: Path) -> None:
    done = run_mitk("demo", "--model", "toy-induction", "--out", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    assert "blocks.0.hook_resid_pre" in done.stdout and "top predictions" in done.stdout
    assert "report written to" in done.stdout


def test_models_lists_the_embedded_model() -> None:
    done = run_mitk("models", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert "toy-induction" in [m["name"] for m in listing["embedded"]]
    assert "gpt2" in listing["architectures"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--model", "no-such-model"], "not a directory holding a checkpoint"),
        (["demo", "--half", "nope"], "Invalid value"),
        (["demo", "--model", "toy-induction", "--prompt", "hi"], "needs a model with a tokenizer"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_exits_2_with_a_message(args: list[str], message: str) -> None:
    done = run_mitk(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_help_on_every_command() -> None:
    for args in (["--help"], ["demo", "--help"], ["models", "--help"]):
        done = run_mitk(*args)
        assert done.returncode == 0 and "Usage" in done.stdout
