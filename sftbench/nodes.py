"""Jobs on several nodes: where a rank runs (node name, node rank, ranks per node), DeepSpeed hostfiles, the
per-node share of the memory prediction, and the per-node view of a run's logs. No torch import: the sweep, the
report and the monitor use it.

Launchers and what they tell a rank (the node rank and count are read in this order):

* DeepSpeed's launcher (``deepspeed``, one node or several, ``--hostfile``/``--no_ssh``): ``CROSS_RANK``,
  ``CROSS_SIZE``, ``LOCAL_SIZE``
* torchrun: ``GROUP_RANK``, ``GROUP_WORLD_SIZE``, ``LOCAL_WORLD_SIZE``
* SLURM (srun): ``SLURM_NODEID``, ``SLURM_NNODES``, ``SLURM_NTASKS_PER_NODE``

A launcher that gives the ranks per node but not the node rank (a plain MPI start) gets it derived as
``rank // ranks_per_node`` (ranks are numbered node by node by all of the above).

The node's name is the host name, unless ``SFTBENCH_NODE_NAME`` is set: several launcher processes on one
machine then log as distinct nodes (how the 2-node CPU test runs two "nodes" on one host). The meta record's
``host`` always stays the real host name: the monitor matches pids on it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

NODE_NAME_ENV = "SFTBENCH_NODE_NAME"
_NODE_RANK_VARS = ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID")
_NUM_NODES_VARS = ("CROSS_SIZE", "GROUP_WORLD_SIZE", "SLURM_NNODES")
_LOCAL_SIZE_VARS = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE")


class NodeError(ValueError):
    pass


def node_name(env: Mapping[str, str] = os.environ) -> str:
    """``SFTBENCH_NODE_NAME`` when set (and not blank), else this machine's host name."""
    name = (env.get(NODE_NAME_ENV) or "").strip()
    return name or socket.gethostname()


def _first_int(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[int | None, str | None]:
    for n in names:
        v = env.get(n)
        if v is None or not v.strip():
            continue
        # SLURM writes tasks per node as '2(x3)' for uneven layouts; the count before the bracket is this node's
        head = v.strip().split("(")[0].split(",")[0]
        if not head.isdigit():
            raise NodeError(f"environment variable {n}={v!r} is not a whole number")
        return int(head), n
    return None, None


def placement(rank: int, world_size: int, local_rank: int, env: Mapping[str, str] = os.environ) -> dict:
    """This rank's place in the job, for the meta record: ``node``, ``node_rank``, ``num_nodes``,
    ``local_world_size`` (ranks on this node). A figure that no launcher variable gives and that cannot be derived
    is None."""
    local_world, _ = _first_int(env, _LOCAL_SIZE_VARS)
    node_rank, _ = _first_int(env, _NODE_RANK_VARS)
    num_nodes, _ = _first_int(env, _NUM_NODES_VARS)
    if node_rank is None and local_world:
        node_rank = rank // local_world  # launchers number ranks node by node
    if num_nodes is None and local_world and world_size % local_world == 0:
        num_nodes = world_size // local_world
    if world_size == 1:  # one process: whatever a stale variable says, it is one node
        node_rank, num_nodes, local_world = 0, 1, 1
    return {"node": node_name(env), "node_rank": node_rank, "num_nodes": num_nodes, "local_world_size": local_world}


def rank0_value(value):
    """Rank 0's ``value`` on every rank (a collective: every rank calls it). For what each rank would otherwise make
    up by itself, such as the default run folder named by the clock: nodes start seconds apart, and one second
    between two ranks would split a run into two folders."""
    import torch.distributed as dist  # here: the sweep, the report and the monitor import this module without torch

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ================================================================================================ hostfiles

@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    """A DeepSpeed hostfile (``<host> slots=<n>`` per line, ``#`` comments), checked line by line: the message names
    the file and the line. At least one host; a host listed twice is refused (DeepSpeed's parser refuses it too)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise NodeError(f"hostfile {p}: cannot read it ({e.strerror or e})") from None
    hosts: list[Host] = []
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise NodeError(f"hostfile {p}, line {i}: expected '<host> slots=<n>', got {raw.strip()!r}")
        slots = parts[1][len("slots="):]
        if not slots.isdigit() or int(slots) < 1:
            raise NodeError(f"hostfile {p}, line {i}: slots must be a whole number >= 1, got {slots!r}")
        if any(h.name == parts[0] for h in hosts):
            raise NodeError(f"hostfile {p}, line {i}: host {parts[0]!r} is listed twice")
        hosts.append(Host(parts[0], int(slots), i))
    if not hosts:
        raise NodeError(f"hostfile {p}: no hosts in it")
    return hosts


def check_layout(hosts: list[Host], num_nodes: int, ranks_per_node: int, hostfile: str | os.PathLike) -> None:
    """The launcher takes the first ``num_nodes`` hosts and ``ranks_per_node`` slots on each: refuse what the
    hostfile cannot give (DeepSpeed would start fewer ranks, or fail later with a less clear message)."""
    if num_nodes > len(hosts):
        raise NodeError(f"--num-nodes {num_nodes}: hostfile {hostfile} lists {len(hosts)} host(s)")
    for h in hosts[:num_nodes]:
        if h.slots < ranks_per_node:
            raise NodeError(f"hostfile {hostfile}, line {h.line}: host {h.name!r} has {h.slots} slot(s), "
                            f"{ranks_per_node} rank(s) per node asked for")


# ================================================================================================ memory

def per_node_prediction(pred: dict, num_nodes: int, ranks_per_node: int, host_total_mib: float | None) -> dict:
    """A ``sftbench.memory.predict(...).to_json()`` dict, predicted without a host limit, with the host figure per
    node.

    Every host term of the prediction is a sum of identical per-rank shares (offloaded partitions, build-time
    copies, process RSS, the dataset), so a node holds ``ranks_per_node`` of them; ``fits`` compares that, not the
    whole job's host memory, with one node's RAM. ``host_mib`` stays the whole job's."""
    out = dict(pred)
    if "host_mib_per_rank" not in pred:
        return out
    per_node = pred["host_mib_per_rank"] * ranks_per_node
    out.update(num_nodes=num_nodes, ranks_per_node=ranks_per_node, host_mib_per_node=per_node)
    if host_total_mib:
        host_ok = per_node <= host_total_mib
        out["fits"] = host_ok if pred.get("fits") is None else bool(pred["fits"]) and host_ok
        out["host_total_mib"] = host_total_mib
    return out


# ================================================================================================ logs, per node

def node_of(meta: Mapping) -> str:
    """A rank's node name from its meta record (logs older than the ``node`` key: the host)."""
    return str(meta.get("node") or meta.get("host") or "?")


def ranks_by_node(metas: Mapping[int, Mapping]) -> dict[str, list[int]]:
    """{node name: its ranks}, nodes in the order of their node rank (then name), ranks sorted."""
    out: dict[str, list[int]] = {}
    order: dict[str, tuple] = {}
    for r in sorted(metas):
        n = node_of(metas[r])
        out.setdefault(n, []).append(r)
        nr = metas[r].get("node_rank")
        order.setdefault(n, (nr if isinstance(nr, int) else 10 ** 6, n))
    return {n: out[n] for n in sorted(out, key=lambda k: order[k])}


def job_nodes(metas: Mapping[int, Mapping]) -> int | None:
    """How many nodes the job ran on: the launcher's count from a meta record, else the nodes seen in the logs."""
    for m in metas.values():
        if isinstance(m.get("num_nodes"), int):
            return m["num_nodes"]
    return len(ranks_by_node(metas)) or None
