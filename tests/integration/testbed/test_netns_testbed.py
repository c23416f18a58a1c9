"""The multi-host test bed (tests.testbed.bed) builds hosts that reach each other, adds
nothing to the root namespace, and leaves nothing behind: on exit of the ``with`` block, on an
exception inside it, on SIGTERM of its owner, and (via ``cleanup``) after its owner was SIGKILLed.

Needs root (network namespaces); skipped elsewhere. Each test takes well under a few seconds.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from tests.testbed import runs as netns_runs
from tests.testbed.bed import Testbed, TestbedConfig, main
from tests.testbed.netns import NETNS_DIR, ip, list_namespaces, namespace_pids, probe_support

_unsupported = probe_support()
pytestmark = pytest.mark.skipif(_unsupported is not None, reason=f"needs network namespaces: {_unsupported}")

PREFIX = "tandem-tbunit"
"""This module's runs, apart from any other test bed on the machine."""


def _config(*hosts: str) -> TestbedConfig:
    return TestbedConfig(hosts=hosts or ("alpha", "beta"), prefix=PREFIX, stop_grace_s=2.0)


def _ours() -> list[str]:
    return [name for name in list_namespaces() if name.startswith(PREFIX + "-")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _root_links() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link", "show").splitlines()}


def test_hosts_get_their_addresses_and_nothing_is_added_to_the_root_namespace():
    links = _root_links()
    with Testbed(_config("alpha", "beta", "gamma")) as bed:
        assert [bed.address(h) for h in bed.hosts] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
        assert _root_links() == links
        assert (
            ip("-4", "-o", "addr", "show", "dev", "eth0", namespace=bed.namespace("beta")).split()[3] == "10.213.0.2/24"
        )
        assert sorted(_ours()) == sorted(bed.namespace(h) for h in ("alpha", "beta", "gamma", "switch"))
    assert _ours() == []


def test_processes_are_stopped_and_namespaces_deleted_when_the_block_raises():
    with pytest.raises(RuntimeError, match="on purpose"), Testbed(_config()) as bed:
        started = bed.run("alpha", ["sleep", "60"])
        # Started behind the bed's back: found by `ip netns pids` and killed all the same.
        stray = subprocess.Popen(["ip", "netns", "exec", bed.namespace("beta"), "sleep", "60"], start_new_session=True)
        deadline = time.monotonic() + 5
        while stray.pid not in namespace_pids(bed.namespace("beta")) and time.monotonic() < deadline:
            time.sleep(0.02)
        raise RuntimeError("on purpose")
    assert started.poll() is not None
    assert stray.wait(5) is not None
    assert _ours() == []


def test_link_down_and_up():
    with Testbed(_config()) as bed:
        alpha = bed.namespace("alpha")
        bed.link_down("alpha")
        assert "state DOWN" in ip("link", "show", "eth0", namespace=alpha)
        bed.link_up("alpha")
        assert "UP" in ip("link", "show", "eth0", namespace=alpha)


_OWNER = """
import sys, time
from tests.testbed.bed import Testbed, TestbedConfig
bed = Testbed(TestbedConfig(hosts=("alpha", "beta"), prefix=sys.argv[1], stop_grace_s=2.0)).start()
child = bed.run("alpha", ["sleep", "60"])
print(bed.run_id, child.pid, flush=True)
time.sleep(60)
"""


def _owner() -> tuple[subprocess.Popen, str, int]:
    """A separate process that owns a bed with one ``sleep`` in it: (process, run id, sleep's pid)."""
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, PREFIX], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    run_id, pid = proc.stdout.readline().split()
    return proc, run_id, int(pid)


def test_sigterm_of_the_owner_tears_its_bed_down():
    proc, run_id, child = _owner()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == -signal.SIGTERM  # torn down, then the signal did what it does by default
    assert not _alive(child)
    assert [name for name in _ours() if run_id in name] == []


_SLOW_TEARDOWN_OWNER = """
import subprocess, sys
from tests.testbed.bed import Testbed, TestbedConfig
bed = Testbed(TestbedConfig(hosts=("alpha", "beta"), prefix=sys.argv[1], stop_grace_s=2.0)).start()
# Ignores SIGTERM, so the teardown waits out its 2 s grace before SIGKILL.
child = bed.run("alpha", ["sh", "-c", "trap '' TERM; echo ready; exec sleep 60"], stdout=subprocess.PIPE)
assert child.stdout.readline() == b"ready\\n"
print(bed.run_id, child.pid, flush=True)
sys.stdin.readline()
print("closing", flush=True)
bed.close()
print("closed", flush=True)
"""


def test_sigterm_during_teardown_waits_for_it_to_finish():
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TEARDOWN_OWNER, PREFIX], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    run_id, child = proc.stdout.readline().split()
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "closing"
    time.sleep(0.5)  # in _stop_processes, waiting out the child's grace
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM  # the signal still ends the process, after the teardown
    assert proc.stdout.read() == ""  # it did not return to the script
    assert not _alive(int(child))
    assert [name for name in _ours() if run_id in name] == []


def test_cleanup_removes_the_runs_of_a_sigkilled_owner_and_leaves_live_ones():
    with Testbed(_config()) as live:
        proc, run_id, child = _owner()
        proc.kill()
        proc.wait(5)
        states = {run.run_id: run.state for run in netns_runs.list_runs(PREFIX)}
        assert states[run_id] == "dead" and states[live.run_id] == "alive"
        assert _alive(child)  # what a SIGKILLed owner leaves behind
        assert netns_runs.cleanup(PREFIX) == [run_id]
        assert not _alive(child)
        assert {run.run_id for run in netns_runs.list_runs(PREFIX)} == {live.run_id}
    assert _ours() == []


def test_cli_up_exec_list_down(capsys):
    assert main(["--prefix", PREFIX, "up", "--hosts", "one,two", "--subnet", "10.99.7.0/29"]) == 0
    run_id = capsys.readouterr().out.split()[1]
    try:
        [run] = [r for r in netns_runs.list_runs(PREFIX) if r.run_id == run_id]
        assert run.state == "detached" and netns_runs.cleanup(PREFIX) == []  # detached runs stay
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.testbed.bed",
                "--prefix",
                PREFIX,
                "exec",
                run_id,
                "two",
                "--",
                "ip",
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "10.99.7.2/29" in out.stdout, out.stderr
        assert main(["--prefix", PREFIX, "list"]) == 0
        assert f"run {run_id} detached" in capsys.readouterr().out
    finally:
        assert main(["--prefix", PREFIX, "down", run_id]) == 0
    assert not (NETNS_DIR / f"{PREFIX}-{run_id}-switch").exists()
    assert _ours() == []


def test_bad_configs_are_refused():
    for bad in (
        {"hosts": ("switch",)},
        {"hosts": ("a", "a")},
        {"hosts": ("Bad_Name",)},
        {"hosts": ("a", "b", "c"), "subnet": "10.1.0.0/30"},
    ):
        with pytest.raises(ValueError):
            TestbedConfig(**bad)
