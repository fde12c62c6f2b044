"""``mitk dla | circuits | sae train | sae eval | dashboard | models`` as a user runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mitk import HookedTransformer
from mitk.analysis.patching import activation_patch, logit_diff
from mitk.cli import app
from mitk.sae import SparseAutoencoder
from mitk.sequences import repeated_random_tokens
from tests.checkpoints import save_gpt2

TOY = ("--model", "toy-induction")
HOOK = "blocks.0.hook_resid_post"


def run_mitk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mitk", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )


def run_json(*args: str) -> dict:
    done = run_mitk(*args, "--json")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1  # exactly one JSON object
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of each result-writing command on the toy model, shared by the tests below."""
    root = tmp_path_factory.mktemp("results")
    dla_out = str(root / "dla.parquet")
    dla = run_json("dla", *TOY, "--induction", "10", "--by", "head", "--out", dla_out)
    (root / "dla.json").write_text(json.dumps(dla))
    circuits = run_json("circuits", *TOY, "--out", str(root / "circuits"))
    (root / "circuits.json").write_text(json.dumps(circuits))
    trained = run_json(
        "sae", "train", *TOY, "--hook", HOOK, "--induction", "20", "--n-sequences", "32",
        "--batch-size", "128", "--total-tokens", str(128 * 40), "--buffer-batches", "4",
        "--expansion", "4", "--k", "8", "--lr", "3e-3", "--log-every", "10",
        "--out", str(root / "sae"), "--log-csv",
    )  # fmt: skip
    (root / "sae.json").write_text(json.dumps(trained))
    return root


def test_dla_parts_sum_to_the_model_logit_and_induction_heads_lead(results: Path) -> None:
    found = json.loads((results / "dla.json").read_text())
    assert found["sum_of_parts"] == pytest.approx(found["model_logit_diff"], abs=1e-4)
    assert found["identity_holds"] and found["max_gap"] < 1e-4
    assert found["top"][0]["component"].startswith("L1H")  # induction heads write the answer
    frame = pd.read_parquet(results / "dla.parquet")
    assert {"component", "prompt", "attribution"} <= set(frame.columns)
    per_prompt = frame.groupby("prompt")["attribution"].sum()
    assert per_prompt.mean() == pytest.approx(found["model_logit_diff"], abs=1e-4)


def test_dla_on_text_prompts_with_a_logit_difference(tmp_path: Path) -> None:
    model = save_gpt2(tmp_path / "gpt2")
    found = run_json(
        "dla", "--model", str(model), "-p", "the cat sat on the", "-p", "a dog ran",
        "--answer", "mat", "--wrong", "house", "--by", "neuron", "--top", "3",
    )  # fmt: skip
    assert found["metric"] == "logit difference" and len(found["top"]) == 3
    assert found["sum_of_parts"] == pytest.approx(found["model_logit_diff"], abs=1e-4)


def test_circuits_finds_the_induction_circuit(results: Path) -> None:
    found = json.loads((results / "circuits.json").read_text())
    detectors = {d["behaviour"]: d for d in found["findings"]["detectors"]}
    assert detectors["induction"]["layer"] == 1 and detectors["induction"]["score"] > 0.5
    assert detectors["previous_token"]["layer"] == 0
    strongest = found["findings"]["composition"][0]
    assert strongest["kind"] == "K" and strongest["writer"].startswith("L0")
    assert strongest["z"] > 5  # far above the random baseline
    induction_heads = [h["label"] for h in found["detectors"] if h["induction"] > 0.5]
    assert induction_heads and all(label.startswith("L1") for label in induction_heads)
    tables = {p.name for p in (results / "circuits").iterdir()}
    assert tables == {"composition.parquet", "detectors.parquet", "ov_copying.parquet",
                      "qk_eigen.parquet"}  # fmt: skip
    ov = pd.read_parquet(results / "circuits" / "ov_copying.parquet")
    assert ov.loc[ov["layer"] == 1, "copying_score"].min() > 0.5  # induction heads copy


def test_sae_train_then_eval(results: Path) -> None:
    trained = json.loads((results / "sae.json").read_text())
    assert trained["metrics"]["l0"] == pytest.approx(8.0) and trained["metrics"]["fvu"] < 1
    sae = SparseAutoencoder.load(results / "sae")
    assert sae.cfg.d_sae == 4 * 64 and sae.cfg.hook_name == HOOK
    log = pd.read_csv(trained["log_csv"])
    assert log["step"].tolist() == [10, 20, 30, 40]
    evaluated = run_json(
        "sae", "eval", "--sae", str(results / "sae"), *TOY, "--induction", "20",
        "--n-sequences", "16", "--seed", "5", "--out", str(results / "sae_eval.parquet"),
    )  # fmt: skip
    assert evaluated["fvu"] < 1 and evaluated["l0"] == pytest.approx(8.0)
    assert evaluated["ce_loss_spliced"] > evaluated["ce_loss_clean"]
    assert evaluated["rows"] == 16 * 41
    assert set(pd.read_parquet(results / "sae_eval.parquet")["metric"]) >= {"fvu", "l0"}


def test_dashboard_from_saved_results(results: Path, tmp_path: Path) -> None:
    model = HookedTransformer.from_pretrained("toy-induction")
    clean = repeated_random_tokens(4, 8, model.cfg.d_vocab, torch.Generator().manual_seed(0))
    corrupted = clean.flip(0)
    patched = activation_patch(model, clean, corrupted, logit_diff(clean[:, -1], corrupted[:, -1],
                               pos=-2), "z", "head").to_frame()  # fmt: skip
    patched.assign(per="head").to_parquet(tmp_path / "patch.parquet")
    out = tmp_path / "page.html"
    found = run_json(
        "dashboard", str(tmp_path / "patch.parquet"), str(results / "dla.parquet"),
        str(results / "circuits"), str(results / "sae"), "--out", str(out),
    )  # fmt: skip
    kinds = [item["kind"] for item in found["inputs"]]
    assert kinds == ["patching", "dla", "composition", "detectors", "ov", "qk", "sae"]
    assert any("training" in title for title in found["sections"])  # sae.log.csv beside it
    page = out.read_text()
    assert "plotly" in page and "<script src=" not in page  # self-contained
    assert page.count("Plotly.newPlot") >= 10


def test_models_finds_the_hugging_face_cache_and_search_folders(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--acme--tiny-gpt2" / "snapshots" / "0123abc"
    save_gpt2(snapshot, n_layer=1, n_embd=16)
    (tmp_path / "hub" / "models--acme--bert" / "snapshots" / "1").mkdir(parents=True)
    (tmp_path / "hub" / "models--acme--bert" / "snapshots" / "1" / "config.json").write_text(
        json.dumps({"model_type": "no-such-architecture"})
    )
    local = save_gpt2(tmp_path / "mine" / "small", n_layer=1, n_embd=16)
    done = run_mitk("models", "--json", "--search", str(tmp_path / "mine"),
                    env={"HF_HUB_CACHE": str(tmp_path / "hub")})  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = {m["name"]: m for m in json.loads(done.stdout)["found"]}
    assert set(found) == {"acme/tiny-gpt2", "small"}
    assert found["acme/tiny-gpt2"]["path"] == str(snapshot)
    assert found["small"]["path"] == str(local) and found["small"]["model_type"] == "gpt2"


def test_quiet_prints_nothing(results: Path) -> None:
    page = ("dashboard", str(results / "dla.parquet"), "--out", str(results / "q.html"))
    for args in (("dla", *TOY, "--induction", "5"), ("circuits", *TOY, "--what", "ov,qk"), page):
        done = run_mitk(*args, "--quiet")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "" and done.stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dla", "--model", "no-such-model", "--induction", "4"], "unknown model 'no-such-model'"),
        (["sae", "train", *TOY, "--hook", "blocks.0.hook_resid_pots", "--induction", "4",
          "--out", "never-written"], "did you mean 'blocks.0.hook_resid_post'"),
        (["sae", "eval", "--sae", "no/such/sae", *TOY, "--induction", "4"], "no/such/sae"),
        (["circuits", *TOY, "--what", "qk,nope"], "choose from qk, ov, composition, detectors"),
        (["dashboard", "missing.parquet"], "'missing.parquet' does not exist"),
        (["models", "--search", "no/such/folder"], "does not exist"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_naming_the_problem(args: list[str], message: str) -> None:
    done = run_mitk(*args)
    assert done.returncode == 2, done.stderr
    assert "error: " in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not Path("never-written").exists()


@pytest.mark.parametrize(
    "command",
    [["dla"], ["circuits"], ["sae"], ["sae", "train"], ["sae", "eval"], ["dashboard"], ["models"],
     ["graph"]],
)  # fmt: skip
def test_help(command: list[str]) -> None:
    # in-process: the help text is typer's alone, so eight interpreter start-ups buy nothing
    done = CliRunner().invoke(app, [*command, "--help"])
    assert done.exit_code == 0 and "Usage" in done.output
    if command == ["sae", "train"]:
        assert "torchrun" in done.output and "--nproc-per-node" in done.output
