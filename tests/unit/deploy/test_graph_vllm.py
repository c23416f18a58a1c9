"""Deployment graphs with vLLM workers: ``engine: vllm`` is accepted, a group's ``vllm:`` mapping
becomes ``--vllm-arg KEY=<json>`` in the worker's argv (and parses back to the same values), and
``vllm:`` on another engine or with a bad shape is a GraphError naming the field."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from tandem.deploy.graph import GraphError, WorkerGroup, load_graph, parse_graph
from tandem.engine.vllm.config import parse_vllm_args

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "graphs"


def _vllm_args(argv: list[str]) -> list[str]:
    """The values after ``--vllm-arg`` (the last flag of the argv)."""
    at = argv.index("--vllm-arg")
    return argv[at + 1 :]


def test_engine_vllm_is_accepted_with_every_role() -> None:
    graph = parse_graph({"workers": [{"engine": "vllm", "role": role} for role in ("agg", "prefill", "decode")]})
    assert [(g.engine, g.role, g.vllm) for g in graph.workers] == [
        ("vllm", "agg", {}),
        ("vllm", "prefill", {}),
        ("vllm", "decode", {}),
    ]
    # Without a vllm: mapping the argv has no --vllm-arg.
    assert graph.workers[0].worker_argv() == [
        "--engine",
        "vllm",
        "--role",
        "agg",
        "--model",
        "smollm2-135m-instruct",
    ]


def test_vllm_mapping_becomes_vllm_args_with_json_values() -> None:
    vllm: dict[str, Any] = {
        "enforce_eager": True,
        "gpu_memory_utilization": 0.8,
        "max_num_seqs": 4,
        "attention_backend": "CPU_ATTN",
        "seed": None,
        "hf_overrides": {"rope_scaling": {"factor": 2.0}},
        "served_model_name": ["a", "b"],
    }
    graph = parse_graph(
        {"workers": [{"engine": "vllm", "model": "m", "flags": {"dtype": "float32", "block-size": 32}, "vllm": vllm}]}
    )
    (group,) = graph.workers
    assert group.vllm == vllm
    assert group.worker_argv() == [
        "--engine",
        "vllm",
        "--role",
        "agg",
        "--model",
        "m",
        "--dtype",
        "float32",
        "--block-size",
        "32",
        "--vllm-arg",
        "enforce_eager=true",
        "gpu_memory_utilization=0.8",
        "max_num_seqs=4",
        'attention_backend="CPU_ATTN"',
        "seed=null",
        'hf_overrides={"rope_scaling": {"factor": 2.0}}',
        'served_model_name=["a", "b"]',
    ]
    # The worker reads them back to the same values (strings too, though quoted).
    assert parse_vllm_args(_vllm_args(group.worker_argv())) == vllm


def test_vllm_args_reach_the_worker_command_line() -> None:
    from tandem.cli.main import build_parser

    group = WorkerGroup(engine="vllm", role="decode", model="m", vllm={"enforce_eager": True, "tokenizer": "x=y"})
    args = build_parser().parse_args(["worker", *group.worker_argv()])
    assert (args.engine, args.role, args.model) == ("vllm", "decode", "m")
    assert parse_vllm_args(args.vllm_arg) == {"enforce_eager": True, "tokenizer": "x=y"}


@pytest.mark.parametrize("engine", ["builtin", "mocker", None])
def test_vllm_mapping_on_another_engine_is_a_graph_error(engine: str | None) -> None:
    group: dict[str, Any] = {"vllm": {"enforce_eager": True}}
    if engine is not None:
        group["engine"] = engine
    with pytest.raises(GraphError, match=r"workers\[1\]\.vllm") as error:
        parse_graph({"workers": [{"engine": "vllm"}, group]})
    assert "engine: vllm" in str(error.value) and repr(engine or "builtin") in str(error.value)


@pytest.mark.parametrize("engine", ["builtin", "mocker"])
def test_an_empty_or_null_vllm_mapping_is_fine_on_any_engine(engine: str) -> None:
    graph = parse_graph({"workers": [{"engine": engine, "vllm": None}, {"engine": engine, "vllm": {}}]})
    assert [g.vllm for g in graph.workers] == [{}, {}]
    assert all("--vllm-arg" not in g.worker_argv() for g in graph.workers)


@pytest.mark.parametrize(
    "vllm, words",
    [
        (["enforce_eager=true"], ["workers[0].vllm", "dict"]),
        ("enforce_eager=true", ["workers[0].vllm", "dict"]),
        ({1: True}, ["workers[0].vllm key", "str"]),
    ],
)
def test_a_vllm_mapping_of_the_wrong_shape_is_a_graph_error(vllm: Any, words: list[str]) -> None:
    with pytest.raises(GraphError) as error:
        parse_graph({"workers": [{"engine": "vllm", "vllm": vllm}]})
    for word in words:
        assert word in str(error.value)


def test_vllm_graph_files_load(tmp_path: Path) -> None:
    path = tmp_path / "vllm.yaml"
    path.write_text(
        "workers:\n"
        "  - engine: vllm\n"
        "    role: prefill\n"
        "    vllm:\n"
        "      enforce_eager: true\n"
        "      max_model_len: 2048\n"
        "      kv_transfer_config: {kv_role: kv_producer}\n"
    )
    (group,) = load_graph(path).workers
    assert _vllm_args(group.worker_argv()) == [
        "enforce_eager=true",
        "max_model_len=2048",
        'kv_transfer_config={"kv_role": "kv_producer"}',
    ]


@pytest.mark.parametrize("name", ["agg_vllm.yaml", "disagg_vllm.yaml"])
def test_example_vllm_graphs_pass_enforce_eager(name: str) -> None:
    graph = load_graph(EXAMPLES / name)
    assert graph.workers and all(g.engine == "vllm" for g in graph.workers)
    for group in graph.workers:
        assert parse_vllm_args(_vllm_args(group.worker_argv())) == {"enforce_eager": True}


def _serve_args(*argv: str) -> argparse.Namespace:
    from tandem.cli import serve_cmd

    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_vllm_args_reach_every_vllm_group() -> None:
    from tandem.cli import serve_cmd

    args = _serve_args("--engine", "vllm", "--vllm-arg", "enforce-eager=true", "max_num_seqs=2", "--vllm-arg", "seed=1")
    (group,) = serve_cmd.build_graph(args).workers
    assert group.engine == "vllm" and group.vllm == {"enforce_eager": True, "max_num_seqs": 2, "seed": 1}
    assert _vllm_args(group.worker_argv()) == ["enforce_eager=true", "max_num_seqs=2", "seed=1"]


def test_serve_vllm_args_without_engine_vllm_are_a_graph_error() -> None:
    from tandem.cli import serve_cmd

    with pytest.raises(GraphError, match="--vllm-arg needs --engine vllm"):
        serve_cmd.build_graph(_serve_args("--vllm-arg", "enforce_eager=true"))
