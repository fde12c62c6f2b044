"""``mitk graph`` as a user runs it: a random GPT-2 with random per-layer transcoders on disk.

The command's graph is checked against the library's on the same weights and prompt: the
page holds the pruned graph's nodes and edges, the JSON is ``frontend_json``'s, and a
circuit-tracer set of the same transcoders gives the same graph as the mitk folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch

from mitk import HookedTransformer
from mitk.analysis.graphs import attribution_graph, frontend_json, prune_graph
from mitk.cli.app import run
from mitk.sae import CLTConfig, CrossLayerTranscoder, SAEConfig, SparseAutoencoder, save_clt
from mitk.sae.transcoder_sets import save_transcoder_set
from mitk.viz.attribution_graph import DATA_ID
from tests.checkpoints import save_gpt2

PROMPT = "the cat sat on the mat and the dog"
D_SAE = 64


def random_transcoders(net: HookedTransformer, reads: str = "ln2.hook_normalized") -> list:
    """One random transcoder per layer, scaled so that about a third of its features fire."""
    gen = torch.Generator().manual_seed(0)
    d = net.cfg.d_model
    made = []
    for layer in range(net.cfg.n_layers):
        cfg = SAEConfig(d_in=d, d_sae=D_SAE, architecture="relu",
                        hook_name=f"blocks.{layer}.{reads}",
                        target_hook_name=f"blocks.{layer}.hook_mlp_out")  # fmt: skip
        sae = SparseAutoencoder(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d, D_SAE, generator=gen) / math.sqrt(d) * 0.6)
            sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.1 - 0.25)
            sae.W_dec.copy_(torch.randn(D_SAE, d, generator=gen) * 0.05)
        made.append(sae)
    return made


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("graph")
    model = save_gpt2(root / "gpt2", n_layer=2)
    net = HookedTransformer.from_pretrained(str(model))
    transcoders = random_transcoders(net)
    for layer, sae in enumerate(transcoders):
        sae.save(root / "transcoders" / f"layer_{layer}")
    (root / "transcoders" / "README.txt").write_text("other entries are ignored")
    save_transcoder_set(transcoders, root / "set")
    tokens = net.to_tokens(PROMPT)[0]
    graph = attribution_graph(net, transcoders, tokens)
    return {"root": root, "model": str(model), "net": net, "graph": graph,
            "transcoders": transcoders}  # fmt: skip


def mitk(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``mitk ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = run([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def graph_args(setup: dict, out: Path, *extra: str) -> list[str]:
    return ["graph", "--model", setup["model"], "--transcoders", str(setup["root"] / "transcoders"),
            "--prompt", PROMPT, "--out", str(out), *extra]  # fmt: skip


def test_the_viewer_page_holds_the_pruned_graph_with_logit_effects(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "graph.html"
    code, stdout, err = mitk(capsys, *graph_args(setup, out), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    graph = setup["graph"]
    pruned = prune_graph(graph)
    assert result["n_features"] == graph.nodes.n_features > 0
    assert result["kept_nodes"] == int(pruned.node_mask.sum())
    assert result["kept_edges"] == int(pruned.edge_mask.sum())
    assert 0 < result["replacement_score"] <= 1 and 0 < result["completeness_score"] <= 1
    assert result["prompt"] == setup["net"].to_str_tokens(PROMPT)
    assert result["format"] == "html" and result["out"] == str(out)
    page = out.read_text(encoding="utf-8")
    data = json.loads(re.findall(rf"id='{DATA_ID}'>(.*?)</script>", page, re.DOTALL)[0])
    assert [n["id"] for n in data["nodes"]] == pruned.node_mask.nonzero()[:, 0].tolist()
    assert len(data["edges"]) == result["kept_edges"]
    assert data["tokens"] == result["prompt"]
    shown = {f"{n['layer']}:{n['feature']}" for n in data["nodes"] if n["kind"] == "feature"}
    assert shown and set(data["features"]) == shown
    # each feature's logit effects: its decoder row through ln_final's linear part and W_U
    net, key = setup["net"], sorted(shown)[0]
    layer, feature = map(int, key.split(":"))
    row = setup["transcoders"][layer].W_dec[feature].detach()
    with torch.no_grad():
        effects = ((row - row.mean()) * net.ln_final.w) @ net.unembed.W_U
        effects = effects - effects.mean()
    listed = data["features"][key]["logit_effects"]
    assert listed[0][1] == pytest.approx(float(effects.max()), rel=1e-4)
    assert listed[-1][1] == pytest.approx(float(effects.min()), rel=1e-4)
    assert "replacement score" in page and "http" not in page


def test_examples_are_each_features_top_contexts_in_a_token_file(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = torch.randint(2, 20, (6, 12), generator=torch.Generator().manual_seed(1))
    corpus[:, 0] = 0  # BOS, as the prompt has
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(row) + "\n" for row in corpus.tolist()))
    out = tmp_path / "graph.html"
    code, _, err = mitk(capsys, *graph_args(setup, out), "--examples", str(examples), "-q")
    assert code == 0, err
    page = out.read_text(encoding="utf-8")
    features = json.loads(re.findall(rf"id='{DATA_ID}'>(.*?)</script>", page, re.DOTALL)[0])[
        "features"
    ]
    net = setup["net"]
    with torch.no_grad():
        _, cache = net.run_with_cache(corpus)
    checked = 0
    for key, entry in features.items():
        layer, feature = map(int, key.split(":"))
        sae = setup["transcoders"][layer]
        with torch.no_grad():
            acts = sae.encode(cache[f"blocks.{layer}.ln2.hook_normalized"])[..., feature]
        listed = entry["examples"]
        assert len(listed) == min(5, int((acts > 0).sum()))
        if listed:
            assert listed[0][1] == pytest.approx(float(acts.max()), rel=1e-4)
            assert all("[" in context for context, _ in listed)
            checked += 1
    assert checked > 0 and "examples from" in page
    code, _, err = mitk(capsys, *graph_args(setup, out), "--examples", str(tmp_path / "none"))
    assert code == 2 and "does not exist" in err


def test_json_output_is_the_frontend_json_and_thresholds_and_caps_apply(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "graph.json"
    code, _, err = mitk(capsys, *graph_args(setup, out), "--node-threshold", "0.9", "-q")
    assert code == 0, err
    written = json.loads(out.read_text())
    expected = frontend_json(setup["graph"], node_threshold=0.9)
    assert written["metadata"]["prompt_tokens"] == setup["net"].to_str_tokens(PROMPT)
    assert written["metadata"]["node_threshold"] == 0.9
    assert [n["node_id"] for n in written["nodes"]] == [n["node_id"] for n in expected["nodes"]]
    assert len(written["links"]) == len(expected["links"])
    code, stdout, err = mitk(capsys, *graph_args(setup, tmp_path / "capped.json"),
                             "--max-feature-nodes", "7", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["n_features"] == 7


def test_a_circuit_tracer_set_gives_the_same_graph(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = []
    for where in ("transcoders", "set/config.yaml", "set"):
        args = graph_args(setup, tmp_path / "g.json", "--json")
        args[args.index("--transcoders") + 1] = str(setup["root"] / where)
        code, stdout, err = mitk(capsys, *args)
        assert code == 0, (where, err)
        results.append({k: v for k, v in json.loads(stdout).items() if k != "transcoders"})
    assert results[0] == results[1] == results[2]


def test_a_cross_layer_transcoder_folder_gives_the_librarys_graph(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CLT's graph from the shell; a feature's logit effects sum its writes into every layer."""
    net, transcoders = setup["net"], setup["transcoders"]
    n_layers, d = net.cfg.n_layers, net.cfg.d_model
    cfg = CLTConfig(n_layers=n_layers, d_model=d, d_sae=D_SAE, activation="relu",
                    input_hook="ln2.hook_normalized")  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for layer, sae in enumerate(transcoders):  # the per-layer encoders; decoders everywhere
            clt.W_enc[layer] = sae.W_enc
            clt.b_enc[layer] = sae.b_enc
    save_clt(clt, tmp_path / "clt")
    args = graph_args(setup, tmp_path / "g.html", "--json")
    args[args.index("--transcoders") + 1] = str(tmp_path / "clt")
    code, stdout, err = mitk(capsys, *args)
    assert code == 0, err
    result = json.loads(stdout)
    graph = attribution_graph(net, clt, net.to_tokens(PROMPT)[0])
    pruned = prune_graph(graph)
    assert result["n_features"] == graph.nodes.n_features > 0
    assert result["kept_nodes"] == int(pruned.node_mask.sum())
    page = (tmp_path / "g.html").read_text(encoding="utf-8")
    data = json.loads(re.findall(rf"id='{DATA_ID}'>(.*?)</script>", page, re.DOTALL)[0])
    first = sorted(k for k in data["features"] if k.startswith("0:"))
    assert first, "no layer-0 feature shown"
    feature = int(first[0].split(":")[1])
    row = clt.W_dec[0][feature].detach().sum(0)  # its writes into layers 0 and 1
    with torch.no_grad():
        effects = ((row - row.mean()) * net.ln_final.w) @ net.unembed.W_U
        effects = effects - effects.mean()
    listed = data["features"][first[0]]["logit_effects"]
    assert listed[0][1] == pytest.approx(float(effects.max()), rel=1e-4)


def test_bad_input_is_exit_2_with_a_message_that_says_what(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(args: list[str], message: str) -> None:
        code, _, err = mitk(capsys, *args)
        assert code == 2 and re.search(message, err), (code, err)
        assert "Traceback" not in err

    out = tmp_path / "g.html"
    refused(graph_args(setup, tmp_path / "g.png"), r"give a \.html file .* or a \.json file")
    two = [*graph_args(setup, out), "--prompt", "a dog"]
    refused(two, "a graph is of one prompt; got 2")
    partial = tmp_path / "partial"
    setup["transcoders"][1].save(partial / "layer_1")
    refused([*graph_args(setup, out)[:4], str(partial), *graph_args(setup, out)[5:]],
            r"no folder for layers \[0\]")  # fmt: skip
    (tmp_path / "empty").mkdir()
    refused([*graph_args(setup, out)[:4], str(tmp_path / "empty"), *graph_args(setup, out)[5:]],
            r"no layer_0/, layer_1/, \.\.\. subfolders")  # fmt: skip
    one = tmp_path / "one"
    setup["transcoders"][0].save(one / "layer_0")
    refused([*graph_args(setup, out)[:4], str(one), *graph_args(setup, out)[5:]],
            r"no transcoder for layers \[1\]")  # fmt: skip
    wrong = tmp_path / "wrong"
    for layer, sae in enumerate(random_transcoders(setup["net"], reads="hook_resid_pre")):
        sae.save(wrong / f"layer_{layer}")
    refused([*graph_args(setup, out)[:4], str(wrong), *graph_args(setup, out)[5:]],
            r"reads 'blocks\.0\.hook_resid_pre'; it must read one of")  # fmt: skip
    refused(["graph", "--model", "toy-induction", "--transcoders", str(one), "--induction", "3",
             "--out", str(out)], "this model has none")  # fmt: skip
    refused(graph_args(setup, out, "--edge-threshold", "1.5"), "edge-threshold")
    assert not out.exists()


@pytest.mark.slow
def test_the_console_command_writes_the_viewer(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "graph.html"
    done = subprocess.run([sys.executable, "-m", "mitk", *graph_args(setup, out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"written to {out}" in done.stdout and "replacement score" in done.stdout
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_help_names_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = mitk(capsys, "graph", "--help")
    assert code == 0
    for option in ("--transcoders", "--out", "--max-feature-nodes", "--node-threshold",
                   "--edge-threshold", "--examples"):  # fmt: skip
        assert option in stdout
