"""Cluster description: nodes x devices, device memory, links, and the profile each device uses.

A YAML file (or a shipped name from `clusters/`):

    nodes: 16                  # machines
    devices_per_node: 8        # ranks per machine (GPUs; on a CPU, processes)
    device_memory: 80GiB       # per device: what a plan may use
    profile: h100-datasheet    # a shipped profile name or a profile JSON path
    backend: nccl              # whose measured costs the links default to
    intra_node: {bandwidth: 450GB/s, latency: 5us}   # optional: default, the profile's backend p2p
    inter_node: {bandwidth: 50GB/s, latency: 10us}   # required when nodes > 1
    cores_per_node: 2          # CPU only: the devices of a node share these cores (time-sliced)

Ranks are numbered node by node: rank r is on node r // devices_per_node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remesh.config import read_yaml
from remesh.planner.profile import HardwareProfile, LinkCost

CLUSTERS_DIR = Path(__file__).resolve().parent / "clusters"
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ns|us|ms|s)\s*$")
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_KEYS = {"nodes", "devices_per_node", "device_memory", "profile", "backend", "intra_node", "inter_node",
         "cores_per_node", "name"}


def _quantity(value: Any, field: str, pattern: re.Pattern, units: dict[str, float], default_unit: str,
              example: str) -> float:
    """A number, or a string of a number and a unit (`pattern`: groups number, unit)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = pattern.match(str(value))
    if not m:
        raise ValueError(f"{field}: expected {example}, got {value!r}")
    return float(m[1]) * units[(m[2] or default_unit).lower()]


def parse_bytes(value: Any, field: str) -> float:
    """`80GiB`, `24GB`, `1.5e9` -> bytes."""
    return _quantity(value, field, _SIZE, _UNITS, "B", "a size such as 80GiB or 24GB")


def parse_seconds(value: Any, field: str) -> float:
    """`5us`, `1ms`, or a number of seconds -> seconds."""
    return _quantity(value, field, _TIME, _SECONDS, "s", "a time such as 5us or 1ms")


@dataclass
class Cluster:
    name: str
    nodes: int
    devices_per_node: int
    device_memory: float  # bytes
    profile: HardwareProfile
    backend: str
    intra_node: LinkCost
    inter_node: LinkCost | None
    cores_per_node: int | None = None  # CPU: devices time-share these cores

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def link(self, ranks_a, ranks_b=()) -> LinkCost:
        """The slowest link among the ranks (inter-node as soon as they span two nodes)."""
        nodes = {self.node_of(r) for r in (*ranks_a, *ranks_b)}
        return self.inter_node if len(nodes) > 1 and self.inter_node is not None else self.intra_node

    def collective(self, op: str, ranks) -> LinkCost:
        """A collective's cost on 2 ranks (see estimator._allreduce), as the profile measured it
        when the ranks share a node and the profile has that op for the cluster's backend; else
        a ring over the link: an all-reduce is two passes of it, an all-gather one."""
        if len({self.node_of(r) for r in ranks}) <= 1:
            measured = self.profile.comm.get(self.backend, {}).get(op)
            if measured is not None and self.intra_node is self.profile.comm[self.backend].get("p2p"):
                return measured
        link = self.link(ranks)
        if op == "all_reduce":
            return LinkCost(2 * link.latency_s, link.bytes_per_s)
        return LinkCost(link.latency_s, 2 * link.bytes_per_s)

    def describe(self) -> str:
        return (f"{self.name}: {self.nodes} node(s) x {self.devices_per_node} devices, "
                f"{self.device_memory / 2**30:.0f} GiB each, profile {self.profile.name} ({self.profile.source})")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "cluster") -> Cluster:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping of cluster fields, got {type(data).__name__}")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
        for key in ("nodes", "devices_per_node", "device_memory", "profile"):
            if key not in data:
                raise ValueError(f"{where}: missing field {key!r}")
        nodes, per = data["nodes"], data["devices_per_node"]
        for key, v in (("nodes", nodes), ("devices_per_node", per)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {key} must be a positive integer, got {v!r}")
        memory = parse_bytes(data["device_memory"], f"{where}: device_memory")
        if memory <= 0:
            raise ValueError(f"{where}: device_memory must be positive, got {data['device_memory']!r}")
        try:
            profile = HardwareProfile.load(data["profile"])
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{where}: profile: {e}") from None
        backend = data.get("backend") or ("nccl" if profile.device == "cuda" else "gloo")

        def link(key: str) -> LinkCost | None:
            spec = data.get(key)
            if spec is None:
                return None
            if not isinstance(spec, dict) or set(spec) - {"bandwidth", "latency"} or "bandwidth" not in spec:
                raise ValueError(f"{where}: {key} must be {{bandwidth: 50GB/s, latency: 10us}}, got {spec!r}")
            bw = parse_bytes(str(spec["bandwidth"]).removesuffix("/s"), f"{where}: {key}.bandwidth")
            return LinkCost(parse_seconds(spec.get("latency", 0.0), f"{where}: {key}.latency"), bw)

        intra = link("intra_node")
        if intra is None:
            try:
                intra = profile.link(backend)
            except KeyError as e:
                raise ValueError(f"{where}: no intra_node link given and {e.args[0]}") from None
        inter = link("inter_node")
        if nodes > 1 and inter is None:
            raise ValueError(f"{where}: {nodes} nodes need an inter_node link {{bandwidth: ..., latency: ...}}")
        cores = data.get("cores_per_node")
        if cores is not None and (not isinstance(cores, int) or cores < 1):
            raise ValueError(f"{where}: cores_per_node must be a positive integer, got {cores!r}")
        return cls(str(data.get("name", where)), nodes, per, memory, profile, backend, intra, inter, cores)

    @classmethod
    def load(cls, spec: str | Path) -> Cluster:
        """A YAML file, or a shipped cluster's name."""
        path = Path(spec)
        if not path.exists() and (CLUSTERS_DIR / f"{spec}.yaml").exists():
            path = CLUSTERS_DIR / f"{spec}.yaml"
        if not path.exists():
            shipped = sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))
            raise ValueError(f"cluster {str(spec)!r}: no such file or shipped cluster (shipped: {', '.join(shipped)})")
        data = read_yaml(str(path))  # a folder, bad bytes or bad YAML: an error naming the file (and line)
        cluster = cls.from_dict(data, str(path))
        if "name" not in data:
            cluster.name = path.stem
        return cluster


def local_cluster(devices: int, profile: str | None = None, device_memory: float | None = None,
                  device: str = "auto") -> Cluster:
    """This machine as a cluster of `devices` local processes (what `trainer.nproc` or torchrun
    starts) on `device` (a run's `trainer.device`; auto: its GPUs where CUDA is available, as the
    ranks then use them, over NCCL), else CPU processes time-sharing its cores; with the profile
    of its processor or GPU (`profile.local_profile`) unless one is named."""
    import os

    import torch

    from remesh.planner.profile import local_profile

    if devices < 1:
        raise ValueError(f"a local cluster needs at least 1 process, got {devices}")
    gpu = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    if gpu and devices > torch.cuda.device_count():  # one GPU per rank: a plan for more would not run
        raise ValueError(f"{devices} processes on GPUs, but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s): set trainer.nproc (or torchrun's --nproc-per-node) to at most that")
    profile = profile or local_profile("cuda" if gpu else "cpu")
    if device_memory is None and gpu:
        device_memory = torch.cuda.get_device_properties(0).total_memory
    elif device_memory is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 16 * 2**30
        device_memory = total * 0.8 / devices
    spec = {"nodes": 1, "devices_per_node": devices, "device_memory": device_memory, "profile": profile,
            "name": f"local-{devices}"}
    if not gpu:
        spec["cores_per_node"] = os.cpu_count() or 1
    return Cluster.from_dict(spec)
