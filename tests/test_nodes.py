"""Jobs on several nodes: where a rank runs (sftbench/nodes.py) and a real 2-node job on this one machine.

The 2-node job is two DeepSpeed launcher processes with --no_ssh (node ranks 0 and 1) meeting over the loopback
address, as two machines would over the network; SFTBENCH_NODE_NAME makes their ranks log as two nodes."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import (BIN, META_NULL, REPO, SAMPLES, STEP_NULL, SUMMARY_NULL, cpu_env, nulls, read_jsonl,
                      write_overfit_config)
from sftbench import nodes
from sftbench.buildenv import free_port
from sftbench.shm import buffer_path



# ------------------------------------------------------------------------------------------------ placement

def test_placement_under_the_deepspeed_launcher():
    env = {"CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2", "SFTBENCH_NODE_NAME": "node1"}
    assert nodes.placement(3, 4, 1, env) == {"node": "node1", "node_rank": 1, "num_nodes": 2, "local_world_size": 2}


def test_placement_under_torchrun_and_slurm():
    torchrun = {"GROUP_RANK": "1", "GROUP_WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "4"}
    assert nodes.placement(5, 12, 1, torchrun)["node_rank"] == 1
    assert nodes.placement(5, 12, 1, torchrun)["num_nodes"] == 3
    slurm = {"SLURM_NODEID": "2", "SLURM_NNODES": "3", "SLURM_NTASKS_PER_NODE": "2(x3)"}
    assert nodes.placement(4, 6, 0, slurm) == {"node": nodes.node_name({}), "node_rank": 2, "num_nodes": 3,
                                                "local_world_size": 2}


def test_placement_derived_single_and_unknown():
    # only the ranks per node known (a plain MPI start): node rank and count follow from the node-major numbering
    assert nodes.placement(5, 8, 1, {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"})["node_rank"] == 1
    assert nodes.placement(5, 8, 1, {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"})["num_nodes"] == 2
    # one process is one node, whatever a stale variable of an outer job says
    assert nodes.placement(0, 1, 0, {"CROSS_SIZE": "4"})["num_nodes"] == 1
    # nothing known: None, not a guess
    p = nodes.placement(1, 2, 1, {})
    assert p["node_rank"] is None and p["num_nodes"] is None and p["local_world_size"] is None
    with pytest.raises(nodes.NodeError, match="CROSS_RANK='x'"):
        nodes.placement(0, 2, 0, {"CROSS_RANK": "x"})


def test_node_name_override():
    assert nodes.node_name({"SFTBENCH_NODE_NAME": " n7 "}) == "n7"
    assert nodes.node_name({"SFTBENCH_NODE_NAME": ""}) == nodes.node_name({})


# ------------------------------------------------------------------------------------------------ hostfiles

def test_read_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# the nodes\nworker-1 slots=8\n\nworker-2 slots=4  # half of it\n")
    assert [(h.name, h.slots, h.line) for h in nodes.read_hostfile(hf)] == [("worker-1", 8, 2), ("worker-2", 4, 4)]
    nodes.check_layout(nodes.read_hostfile(hf), 2, 4, hf)
    with pytest.raises(nodes.NodeError, match=r"line 4: host 'worker-2' has 4 slot\(s\), 8 rank\(s\) per node"):
        nodes.check_layout(nodes.read_hostfile(hf), 2, 8, hf)
    with pytest.raises(nodes.NodeError, match="--num-nodes 3: hostfile .* lists 2 host"):
        nodes.check_layout(nodes.read_hostfile(hf), 3, 1, hf)


@pytest.mark.parametrize("text, match", [
    ("worker-1 slots=8\nworker-2\n", "line 2: expected '<host> slots=<n>'"),
    ("worker-1 slots=0\n", "line 1: slots must be a whole number >= 1"),
    ("a slots=1\nb slots=1\na slots=2\n", "line 3: host 'a' is listed twice"),
    ("# nothing\n\n", "no hosts in it"),
])
def test_bad_hostfile_names_file_and_line(tmp_path, text, match):
    hf = tmp_path / "hostfile"
    hf.write_text(text)
    with pytest.raises(nodes.NodeError, match=match) as e:
        nodes.read_hostfile(hf)
    assert str(hf) in str(e.value)
    with pytest.raises(nodes.NodeError, match="cannot read it"):
        nodes.read_hostfile(tmp_path / "missing")


def test_per_node_prediction():
    pred = {"gpu_mib": 10_000.0, "host_mib": 40_000.0, "host_mib_per_rank": 5_000.0, "fits": True,
            "inputs": {"world_size": 8}}
    out = nodes.per_node_prediction(pred, num_nodes=2, ranks_per_node=4, host_total_mib=30_000.0)
    assert out["host_mib_per_node"] == 20_000.0 and out["host_mib"] == 40_000.0 and out["fits"] is True
    # the whole job (40 GB) would not fit one node's 30 GB; a node's share (20 GB) does. 16 GB nodes: no
    assert nodes.per_node_prediction(pred, 2, 4, 16_000.0)["fits"] is False
    assert nodes.per_node_prediction({**pred, "fits": False}, 2, 4, 30_000.0)["fits"] is False  # GPU too small
    assert nodes.per_node_prediction({**pred, "fits": None}, 2, 4, 30_000.0)["fits"] is True
    assert nodes.per_node_prediction({"error": "x"}, 2, 4, 1.0) == {"error": "x"}


def test_ranks_by_node():
    metas = {0: {"node": "a", "node_rank": 0, "num_nodes": 2}, 1: {"node": "a", "node_rank": 0},
             3: {"node": "b", "node_rank": 1}, 2: {"node": "b", "node_rank": 1}}
    assert nodes.ranks_by_node(metas) == {"a": [0, 1], "b": [2, 3]}
    assert nodes.job_nodes(metas) == 2
    old = {0: {"host": "h1"}, 1: {"host": "h2"}}  # logs from before the node keys: the host
    assert nodes.ranks_by_node(old) == {"h1": [0], "h2": [1]} and nodes.job_nodes(old) == 2


@pytest.mark.slow
def test_rank0_value_reaches_every_rank():
    """Two gloo ranks each make up their own value (as each node's clock names the default run folder): both end
    up with rank 0's."""
    port = str(free_port())
    # os._exit as train.py ends: gloo's native destructors can abort a finished process at interpreter teardown
    code = ("import os, torch.distributed as d; from sftbench.nodes import rank0_value; "
            "d.init_process_group('gloo'); print('got', rank0_value('folder-of-rank-' + os.environ['RANK']), "
            "flush=True); d.barrier(); os._exit(0)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, PYTHONPATH=str(REPO))) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all("got folder-of-rank-0" in o for o in outs), outs


# ------------------------------------------------------------------------------------------------ a real 2-node job

def run_nodes(cmds: list[tuple[list[str], dict]], timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each in its own process group, as separate machines would), wait for all;
    on timeout kill every group and fail."""
    procs = [subprocess.Popen(c, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c, e in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tails = "\n".join((p.communicate()[0] or "")[-3000:] for p in procs)
        pytest.fail(f"timed out after {timeout} s: {[shlex.join(c) for c, _ in cmds]}\n{tails}")
    return [subprocess.CompletedProcess(c, p.returncode, o, "") for (c, _), p, o in zip(cmds, procs, outs)]


def two_node_commands(tmp_path, run_dirs, ranks_per_node: int = 2):
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in SAMPLES) + "\n")
    ds = write_overfit_config("z1.json", tmp_path / "z1.json")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"node0 slots={ranks_per_node}\nnode1 slots={ranks_per_node}\n")
    port = free_port()
    cmds = []
    for r in (0, 1):
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
               "--num_nodes", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "train.py"), "--ds", str(ds), "--data", str(data), "--run-dir", str(run_dirs[r]),
               "--cache-dir", str(tmp_path / f"cache{r}"), "--model", "pangu-tiny", "--seq-len", "64",
               "--max-steps", "8", "--warmup-steps", "2", "--precision", "fp32", "--seed", "7",
               "--no-mask-prompt", "--lr-schedule", "config"]  # the reference's layout, whose loss falls by > 1
        cmds.append((cmd, cpu_env(SFTBENCH_NODE_NAME=f"node{r}")))
    return cmds, port


@pytest.mark.slow
def test_two_node_no_ssh_job_logs_report_and_monitor(tmp_path):
    # Node-local disks: each node writes its own folder; node 1's is then copied back (the report reads both)
    sweep0, sweep1 = tmp_path / "node0" / "runs", tmp_path / "node1" / "runs"
    run_dirs = [sweep0 / "job", sweep1 / "job"]
    cmds, port = two_node_commands(tmp_path, run_dirs)
    results = run_nodes(cmds)
    for p in results:
        assert p.returncode == 0, p.stdout[-4000:]
    assert sorted(f.name for f in run_dirs[0].iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    assert sorted(f.name for f in run_dirs[1].iterdir()) == ["rank2.jsonl", "rank3.jsonl"]
    for rank in range(4):
        recs = read_jsonl(run_dirs[rank // 2] / f"rank{rank}.jsonl")
        meta, steps, summary = recs[0], [r for r in recs if r["type"] == "step"], recs[-1]
        assert nulls(meta) == META_NULL and [nulls(s) for s in steps] == [STEP_NULL] * 8
        assert summary["type"] == "summary" and nulls(summary) == SUMMARY_NULL
        assert (meta["rank"], meta["local_rank"], meta["world_size"]) == (rank, rank % 2, 4)
        assert (meta["node"], meta["node_rank"], meta["num_nodes"], meta["local_world_size"]) == \
            (f"node{rank // 2}", rank // 2, 2, 2)
        # host memory is predicted for one node's two ranks, the whole job's kept beside it
        assert meta["predicted"]["host_mib_per_node"] == pytest.approx(2 * meta["predicted"]["host_mib_per_rank"])
        assert summary["status"] == "ok" and summary["measured_steps"] == 6
        assert summary["final_loss"] < summary["first_loss"] - 1.0, (summary["first_loss"], summary["final_loss"])
        # rates count the whole job: 1 sample x 2 micro-batches x 4 ranks per step
        assert all(s["samples_per_s"] * s["step_s"] == pytest.approx(8) for s in steps)
        assert summary["tokens_per_s_per_gpu"] == pytest.approx(summary["tokens_per_s"] / 4)
    # rank 0 (node 0) prints the steps; node 1's console has none of them
    assert results[0].stdout.count("step 8/8") == 1 and "on 2 nodes" in results[0].stdout
    assert "step 8/8" not in results[1].stdout
    # DeepSpeed's CPU shm all-reduce is only for ranks of one node: no 66 MB buffer is left for any rank
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    assert [str(buffer_path(r, env)) for r in range(4) if buffer_path(r, env).exists()] == []

    # the report reads node 0's folder and node 1's copy
    out = tmp_path / "results"
    rep = subprocess.run([sys.executable, "-m", "sftbench.report", str(sweep0), "--node-dir", str(sweep1),
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    summaries = [json.loads(line) for line in (out / "summaries.jsonl").read_text().splitlines()]
    assert sorted(s["rank"] for s in summaries if s.get("type") == "summary") == [0, 1, 2, 3]
    md = (out / "results.md").read_text()
    assert "`job`: 2 nodes; host RAM is the largest node's" in md and "logs of 2 of the 2 nodes read" in md
    row = next(iter(__import__("csv").DictReader(open(out / "results.csv", encoding="utf-8"))))
    assert row["num_nodes"] == "2" and row["meta_world_size"] == "4"
    assert float(row["host_rss_mib_max_over_nodes"]) < float(row["host_rss_mib_sum_over_ranks"])
    # without node 1's folder the report says what it is missing
    rep1 = subprocess.run([sys.executable, "-m", "sftbench.report", str(sweep0), "--out", str(tmp_path / "r1")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rep1.returncode == 0 and "logs of 1 of the 2 nodes read" in (tmp_path / "r1" / "results.md").read_text()

    # the monitor, once node 1's rank files are copied back beside node 0's: every rank, each with its node
    for f in run_dirs[1].iterdir():
        shutil.copy(f, run_dirs[0] / f.name)
    mon = subprocess.run([sys.executable, "monitor.py", "--once", "--no-gpu", str(run_dirs[0])], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert mon.returncode == 0, mon.stderr
    print(mon.stdout)  # the closing note shows it (pytest -s)
    assert "world 4 on 2 nodes (node0, node1)" in mon.stdout
    ranks = mon.stdout.split("RANKS")[1].split("HISTORY")[0].splitlines()
    rows = {ln.split()[0]: ln.split()[1] for ln in ranks if ln.strip()[:1].isdigit()}
    assert rows == {"0": "node0", "1": "node0", "2": "node1", "3": "node1"}
    assert "[ok]" in mon.stdout and "8 [ok]" in mon.stdout


@pytest.mark.slow
def test_two_node_torchrun_job(tmp_path):
    """torchrun's static rendezvous, one CPU rank per node, both writing into one folder (a shared file system)."""
    cmds, _ = two_node_commands(tmp_path, [tmp_path / "job"] * 2, ranks_per_node=1)
    port = free_port()
    torchrun = []
    for r, (cmd, env) in enumerate(cmds):
        train_args = cmd[cmd.index(str(REPO / "train.py")):]
        torchrun.append(([str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                          "--master-addr", "127.0.0.1", "--master-port", str(port), *train_args], env))
    results = run_nodes(torchrun)
    for p in results:
        assert p.returncode == 0, p.stdout[-4000:]
    for rank in (0, 1):
        recs = read_jsonl(tmp_path / "job" / f"rank{rank}.jsonl")
        meta, summary = recs[0], recs[-1]
        assert nulls(meta) == META_NULL and summary["type"] == "summary" and nulls(summary) == SUMMARY_NULL
        assert (meta["rank"], meta["local_rank"], meta["world_size"]) == (rank, 0, 2)
        assert (meta["node"], meta["node_rank"], meta["num_nodes"], meta["local_world_size"]) == \
            (f"node{rank}", rank, 2, 1)
        assert summary["status"] == "ok" and summary["final_loss"] < summary["first_loss"] - 1.0
