"""Deployment graphs: defaults, the shipped example, worker argv, and a GraphError per bad field;
the command-line flags of `tandem serve`, `worker` and `frontend` (overrides, help texts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.deploy.graph import DEFAULT_MODEL, GraphError, WorkerGroup, load_graph, parse_graph
from tandem.frontend.config import FrontendConfig

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "graphs"


def test_empty_graph_gets_the_defaults():
    graph = parse_graph({})
    assert graph.frontend == FrontendConfig()
    assert graph.discovery is None
    assert len(graph.workers) == 1
    (group,) = graph.workers
    assert (group.count, group.engine, group.role, group.model, group.flags) == (1, "builtin", "agg", DEFAULT_MODEL, {})
    assert graph.models == [DEFAULT_MODEL]


def test_worker_group_defaults_fill_missing_keys():
    graph = parse_graph(
        {
            "workers": [{"engine": "mocker"}, {"count": 0, "role": "decode", "model": "m"}],
            "discovery": "file:/tmp/d",
            "frontend": {"port": 0, "router": "random"},
        }
    )
    first, second = graph.workers
    assert (first.count, first.engine, first.role, first.model) == (1, "mocker", "agg", DEFAULT_MODEL)
    assert (second.count, second.role, second.model) == (0, "decode", "m")
    assert graph.discovery == "file:/tmp/d"
    assert graph.frontend.port == 0 and graph.frontend.router == "random" and graph.frontend.host == "127.0.0.1"
    assert graph.models == sorted([DEFAULT_MODEL, "m"])


def test_frontend_values_of_the_right_type_are_accepted():
    graph = parse_graph(
        {
            "frontend": {
                "host": "0.0.0.0",
                "port": 0,
                "router": "random",
                "max_body_bytes": 2048,
                "default_max_tokens": None,
                "max_attempts": 1,
                "worker_down_s": 1,
                "worker_stats_interval_s": 0.5,
                "access_log": True,
            }
        }
    )
    assert graph.frontend.worker_down_s == 1 and graph.frontend.access_log is True


def test_every_frontend_field_is_type_checked():
    from tandem.deploy.graph import _FRONTEND_KINDS

    for name, spec in FrontendConfig.__dataclass_fields__.items():
        assert str(spec.type) in _FRONTEND_KINDS, name


def test_null_sections_mean_defaults():
    graph = parse_graph({"frontend": None, "workers": [{"flags": None}]})
    assert graph.frontend == FrontendConfig() and graph.workers[0].flags == {}


def test_served_model_name_flag_names_the_model():
    graph = parse_graph({"workers": [{"flags": {"served-model-name": "alias"}}]})
    assert graph.models == ["alias"]


def test_example_agg_graph_loads():
    graph = load_graph(EXAMPLES / "agg.yaml")
    assert graph.frontend.host == "127.0.0.1" and graph.frontend.port == 8000
    assert graph.frontend.router == "round-robin"
    (group,) = graph.workers
    assert (group.count, group.engine, group.role, group.model) == (1, "builtin", "agg", "smollm2-135m-instruct")
    assert group.flags == {"dtype": "float32", "kv-cache-gib": 1, "max-num-seqs": 64}
    assert group.worker_argv() == [
        "--engine",
        "builtin",
        "--role",
        "agg",
        "--model",
        "smollm2-135m-instruct",
        "--dtype",
        "float32",
        "--kv-cache-gib",
        "1",
        "--max-num-seqs",
        "64",
    ]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_graph_loads(path):
    graph = load_graph(path)
    assert graph.workers and all(g.worker_argv()[:2] == ["--engine", g.engine] for g in graph.workers)


def test_worker_argv_renders_flags():
    group = WorkerGroup(
        engine="mocker",
        role="prefill",
        model="m",
        flags={
            "max_num_seqs": 8,
            "speedup-ratio": 2.5,
            "enable-prefix-caching": True,
            "kv-events": False,
            "name": None,
            "tokenizer": "some/dir",
        },
    )
    assert group.worker_argv() == [
        "--engine",
        "mocker",
        "--role",
        "prefill",
        "--model",
        "m",
        "--max-num-seqs",
        "8",
        "--speedup-ratio",
        "2.5",
        "--enable-prefix-caching",
        "--tokenizer",
        "some/dir",
    ]


def test_load_graph_reports_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(GraphError, match="cannot read graph"):
        load_graph(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [\n  - count: 1\n")
    with pytest.raises(GraphError, match="not valid YAML"):
        load_graph(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(GraphError, match=str(listy)):
        load_graph(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(GraphError):
        load_graph(empty)


MALFORMED = [
    # (id, graph, words the message must contain)
    ("top-level-not-a-mapping", ["workers"], ["graph", "dict"]),
    ("unknown-top-key", {"workerz": []}, ["workerz"]),
    ("workers-not-a-list", {"workers": {"count": 1}}, ["workers", "list"]),
    ("empty-workers", {"workers": []}, ["workers", "at least one"]),
    ("group-not-a-mapping", {"workers": ["mocker"]}, ["workers[0]", "dict"]),
    ("unknown-group-key", {"workers": [{"engine": "mocker", "replicas": 2}]}, ["workers[0]", "replicas"]),
    ("count-string", {"workers": [{"count": "2"}]}, ["workers[0].count", "int"]),
    ("count-bool", {"workers": [{"count": True}]}, ["workers[0].count", "int"]),
    ("count-float", {"workers": [{"count": 1.5}]}, ["workers[0].count"]),
    ("negative-count", {"workers": [{}, {"count": -1}]}, ["workers[1].count", ">= 0", "-1"]),
    ("bad-engine", {"workers": [{"engine": "vllm-tpu"}]}, ["workers[0].engine", "vllm-tpu"]),
    ("engine-not-a-string", {"workers": [{"engine": 3}]}, ["workers[0].engine", "str"]),
    ("bad-role", {"workers": [{"role": "both"}]}, ["workers[0].role", "both"]),
    ("model-not-a-string", {"workers": [{"model": ["a"]}]}, ["workers[0].model", "str"]),
    ("flags-not-a-mapping", {"workers": [{"flags": ["dtype=float32"]}]}, ["workers[0].flags", "dict"]),
    ("flag-sets-model", {"workers": [{"flags": {"model": "other"}}]}, ["workers[0].flags.model"]),
    ("flag-sets-engine", {"workers": [{"flags": {"engine": "mocker"}}]}, ["workers[0].flags.engine"]),
    ("flag-sets-role", {"workers": [{"flags": {"role": "decode"}}]}, ["workers[0].flags.role"]),
    ("flag-sets-discovery", {"workers": [{"flags": {"discovery": "file"}}]}, ["workers[0].flags.discovery"]),
    ("flag-value-a-nested-list", {"workers": [{"flags": {"dtype": [["a"], "b"]}}]}, ["workers[0].flags.dtype"]),
    ("flag-value-a-mapping", {"workers": [{"flags": {"x": {"y": 1}}}]}, ["workers[0].flags.x"]),
    ("discovery-not-a-string", {"discovery": 5}, ["discovery", "str"]),
    ("bad-event-plane", {"event_plane": "kafka"}, ["event_plane", "kafka"]),
    ("nats-url-not-a-string", {"event_plane": "nats", "nats_url": 4222}, ["nats_url", "str"]),
    (
        "flag-sets-event-plane",
        {"workers": [{"flags": {"event-plane": "nats"}}]},
        ["workers[0].flags.event-plane", "top of the graph"],
    ),
    ("flag-sets-nats-url", {"workers": [{"flags": {"nats-url": "nats://h:1"}}]}, ["workers[0].flags.nats-url"]),
    ("frontend-not-a-mapping", {"frontend": "127.0.0.1:8000"}, ["frontend", "dict"]),
    ("unknown-frontend-key", {"frontend": {"bind": "0.0.0.0"}}, ["frontend", "bind"]),
    ("frontend-bad-port", {"frontend": {"port": 70000}}, ["frontend", "port"]),
    ("frontend-bad-body-limit", {"frontend": {"max_body_bytes": 10}}, ["frontend", "max_body_bytes"]),
    ("frontend-port-string", {"frontend": {"port": "8000"}}, ["frontend.port", "int"]),
    ("frontend-port-bool", {"frontend": {"port": True}}, ["frontend.port", "int"]),
    ("frontend-host-number", {"frontend": {"host": 127}}, ["frontend.host", "str"]),
    ("frontend-router-number", {"frontend": {"router": 5}}, ["frontend.router", "str"]),
    ("frontend-unknown-router", {"frontend": {"router": "fastest"}}, ["frontend.router", "fastest"]),
    ("frontend-down-s-string", {"frontend": {"worker_down_s": "5s"}}, ["frontend.worker_down_s", "float"]),
    ("frontend-access-log-string", {"frontend": {"access_log": "yes"}}, ["frontend.access_log", "bool"]),
    ("frontend-default-max-tokens-string", {"frontend": {"default_max_tokens": "16"}}, ["frontend.default_max_tokens"]),
    ("frontend-default-max-tokens-zero", {"frontend": {"default_max_tokens": 0}}, ["frontend", "default_max_tokens"]),
]


@pytest.mark.parametrize(("data", "words"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_graph_raises_graph_error_naming_the_field(data, words):
    with pytest.raises(GraphError) as err:
        parse_graph(data)
    message = str(err.value)
    for word in words:
        assert word in message, (word, message)


def test_graph_error_is_a_value_error():
    assert issubclass(GraphError, ValueError)


def test_list_flag_values_expand_to_several_arguments():
    group = parse_graph({"workers": [{"engine": "mocker", "flags": {"mocker-decode-coeffs": [0, 0, 10]}}]}).workers[0]
    argv = group.worker_argv()
    at = argv.index("--mocker-decode-coeffs")
    assert argv[at + 1 : at + 4] == ["0", "0", "10"]


def _serve_args(*argv: str):
    import argparse

    from tandem.cli.frontend_cmd import add_frontend_args

    parser = argparse.ArgumentParser()
    add_frontend_args(parser, defaults=False)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("command", ["serve", "worker", "frontend"])
def test_every_option_has_help_that_shows_its_default(command):
    import argparse

    from tandem.cli.main import build_parser

    [subparsers] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    parser = subparsers.choices[command]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue  # -h, and on/off switches (off by default)
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"tandem {command} {name} has no help"
        text = action.help % {**vars(action), "prog": parser.prog}  # as --help prints it
        assert "default" in text, f"tandem {command} {name}: no default in {text!r}"
        if action.default is not None:  # the value itself, not only the word
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert shown in text, f"tandem {command} {name}: default {shown!r} not in {text!r}"


def test_serve_flags_left_unset_keep_the_graphs_frontend_values():
    from tandem.cli.frontend_cmd import frontend_config_from_args

    graph = parse_graph(
        {
            "frontend": {
                "router": "kv",
                "kv_overlap_credit": 0.5,
                "kv_prefill_load_scale": 4.0,
                "kv_temperature": 0.2,
                "max_body_bytes": 10000,
                "default_max_tokens": 7,
            }
        }
    )
    config = frontend_config_from_args(_serve_args(), graph.frontend)
    assert (
        config.router,
        config.kv_overlap_credit,
        config.kv_prefill_load_scale,
        config.kv_temperature,
        config.max_body_bytes,
        config.default_max_tokens,
    ) == ("kv", 0.5, 4.0, 0.2, 10000, 7)


def test_serve_flags_given_override_the_graph():
    from tandem.cli.frontend_cmd import frontend_config_from_args

    graph = parse_graph({"frontend": {"router": "kv", "kv_prefill_load_scale": 4.0, "max_body_bytes": 10000}})
    args = _serve_args("--kv-prefill-load-scale", "2", "--max-body-bytes", "5000", "--router", "round-robin")
    config = frontend_config_from_args(args, graph.frontend)
    assert (config.router, config.kv_prefill_load_scale, config.max_body_bytes) == ("round-robin", 2.0, 5000)


def test_event_plane_defaults_to_zmq_and_nats_reaches_every_worker_and_the_frontend(tmp_path):
    from tandem.deploy.local import LocalDeployment

    assert parse_graph({}).event_plane_argv() == ["--event-plane", "zmq"]
    graph = parse_graph(
        {
            "event_plane": "nats",
            "nats_url": "nats://10.0.0.5:4222",
            "frontend": {"router": "kv"},
            "workers": [{"engine": "mocker"}, {"engine": "mocker", "role": "decode"}],
        }
    )
    assert graph.frontend.nats_url == "nats://10.0.0.5:4222"  # the embedded router follows the same server
    deployment = LocalDeployment(graph, f"file:{tmp_path}")
    for group in graph.workers:
        argv = deployment._spawn_argv(group)
        at = argv.index("--event-plane")
        assert argv[at : at + 4] == ["--event-plane", "nats", "--nats-url", "nats://10.0.0.5:4222"]
    # Without a URL the workers use their default and the frontend reads the server from their cards.
    assert parse_graph({"event_plane": "nats"}).frontend.nats_url is None


def test_serve_event_plane_flags_override_the_graph():
    import argparse

    from tandem.cli import serve_cmd

    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    graph_args = ["serve", "--engine", "mocker"]
    args = parser.parse_args([*graph_args, "--event-plane", "nats", "--nats-url", "nats://127.0.0.1:9"])
    graph = serve_cmd.build_graph(args)
    assert (graph.event_plane, graph.nats_url, graph.frontend.nats_url) == (
        "nats",
        "nats://127.0.0.1:9",
        "nats://127.0.0.1:9",
    )
    assert serve_cmd.build_graph(parser.parse_args(graph_args)).event_plane == "zmq"
