"""Layouts: how one model's parameters lie on a device mesh under a 3D parallel strategy.

A `Layout` is a mesh (an ordered set of global ranks) with data (dp), tensor (tp) and pipeline
(pp) degrees whose product is the mesh size. Mesh position i has coordinates
(pp, dp, tp) = (i // (dp * tp), (i // tp) % dp, i % tp): tensor-parallel peers are adjacent
ranks (the fastest links on a node), pipeline stages are the outermost split.

`ShardSpec` says, for every parameter of a model, which dimension tensor parallelism splits
(Megatron's column / row split of each projection, a vocabulary split of the embedding and the
LM head, replication of norms and the value head) and which pipeline stages hold it. From the
two, `local_slice` gives the exact slice of a parameter that a rank holds: the single source of
truth for sharding the model, reallocating it between layouts and estimating its memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from remesh.model.llama import ModelArgs, Transformer

_LAYOUT = re.compile(r"^(?P<degrees>(?:[dtpm]\d+)+)?(?:@(?P<ranks>[\d,\-\s]+))?$")


def parse_ranks(text: str) -> tuple[int, ...]:
    """'0-3' -> (0, 1, 2, 3); '0,2,4-5' -> (0, 2, 4, 5)."""
    ranks: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"ranks {text!r}: empty item")
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"ranks {text!r}: {part!r} is not N or N-M")
        a, b = int(lo), int(hi or lo)
        if b < a:
            raise ValueError(f"ranks {text!r}: range {part!r} runs backwards")
        ranks.extend(range(a, b + 1))
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks {text!r}: a rank appears twice")
    return tuple(ranks)


def format_ranks(ranks: tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 6) -> '0-3,6'."""
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class Layout:
    ranks: tuple[int, ...]
    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1  # pipeline / gradient-accumulation micro-batches per call

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout {self}: {name} must be >= 1")
        if not self.ranks:
            raise ValueError("a layout needs at least one rank")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"layout {self}: a rank appears twice")
        if list(self.ranks) != sorted(self.ranks):
            # process groups order their ranks by number: a mesh in another order would gather a
            # tensor-parallel head's vocabulary slices, and hand data between meshes, out of place
            raise ValueError(f"layout {self}: list its ranks in ascending order")
        if self.dp * self.tp * self.pp != len(self.ranks):
            raise ValueError(f"layout {self}: d{self.dp} x t{self.tp} x p{self.pp} = "
                             f"{self.dp * self.tp * self.pp} ranks, but the mesh has {len(self.ranks)}")

    @classmethod
    def parse(cls, text: str, default_ranks: tuple[int, ...] | None = None) -> Layout:
        """'d2t2@0-3', 'd4@0-3', 'p2m4@4-5', 't2' (ranks from `default_ranks`). tp, pp and
        micro-batches left out are 1; dp left out fills the mesh (mesh size / (tp * pp))."""
        m = _LAYOUT.match(text.strip())
        if not m:
            raise ValueError(f"layout {text!r}: expected e.g. d2t2p1@0-3 (degrees d/t/p, micro-batches m, ranks)")
        degrees = {k: int(v) for k, v in re.findall(r"([dtpm])(\d+)", m["degrees"] or "")}
        if m["ranks"] is not None:
            ranks = parse_ranks(m["ranks"])
        elif default_ranks is not None:
            ranks = tuple(default_ranks)
        else:
            raise ValueError(f"layout {text!r}: no ranks (add @0-3)")
        tp, pp = degrees.get("t", 1), degrees.get("p", 1)
        if "d" not in degrees and len(ranks) % (tp * pp):
            raise ValueError(f"layout {text!r}: t{tp} x p{pp} does not divide the {len(ranks)} ranks")
        dp = degrees.get("d", len(ranks) // (tp * pp))
        return cls(ranks, dp=dp, tp=tp, pp=pp, micro_batches=degrees.get("m", 1))

    def __str__(self) -> str:
        s = f"d{self.dp}t{self.tp}" + (f"p{self.pp}" if self.pp > 1 else "")
        s += f"m{self.micro_batches}" if self.micro_batches > 1 else ""
        return f"{s}@{format_ranks(self.ranks)}"

    @property
    def size(self) -> int:
        return len(self.ranks)

    def coord(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of a global rank in this mesh."""
        i = self.ranks.index(rank)
        return i // (self.dp * self.tp), (i // self.tp) % self.dp, i % self.tp

    def rank_at(self, pp: int, dp: int, tp: int) -> int:
        return self.ranks[(pp * self.dp + dp) * self.tp + tp]

    def tp_group(self, rank: int) -> tuple[int, ...]:
        p, d, _ = self.coord(rank)
        return tuple(self.rank_at(p, d, t) for t in range(self.tp))

    def dp_group(self, rank: int) -> tuple[int, ...]:
        p, _, t = self.coord(rank)
        return tuple(self.rank_at(p, d, t) for d in range(self.dp))

    def pp_group(self, rank: int) -> tuple[int, ...]:
        _, d, t = self.coord(rank)
        return tuple(self.rank_at(p, d, t) for p in range(self.pp))

    def replica_group(self, rank: int) -> tuple[int, ...]:
        """Every rank of the rank's data-parallel replica (its stages and tp peers), in mesh order."""
        _, d, _ = self.coord(rank)
        return tuple(self.rank_at(p, d, t) for p in range(self.pp) for t in range(self.tp))

    def groups(self) -> list[tuple[int, ...]]:
        """Every tp, dp, pp and replica group of the mesh (size > 1), and the (first stage, last
        stage) pairs that sum a tied embedding's gradient, for creating process groups up front."""
        out: set[tuple[int, ...]] = set()
        for r in self.ranks:
            for g in (self.tp_group(r), self.dp_group(r), self.pp_group(r), self.replica_group(r)):
                if len(g) > 1:
                    out.add(g)
            if self.pp > 1:
                _, d, t = self.coord(r)
                out.add((self.rank_at(0, d, t), self.rank_at(self.pp - 1, d, t)))
        return sorted(out)


# Megatron's split: column-parallel projections split their output features, row-parallel
# ones their input features; embedding and LM head split the vocabulary.
_COLUMN = re.compile(r"\.(attention\.w[qkv]|feed_forward\.w[13])\.(weight|bias)$")
_ROW = re.compile(r"\.(attention\.wo|feed_forward\.w2)\.weight$")
_VOCAB = re.compile(r"^(tok_embeddings|output)\.weight$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class ParamShard:
    """Where one parameter lives: its full shape, the dim tp splits (None: replicated) and the
    pipeline stages that hold it."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    stages: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class ShardSpec:
    """The sharding of one model architecture (parameter names and shapes from a meta-device
    model, so it always agrees with `Transformer`)."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32):
        self.args, self.dtype = args, dtype
        with torch.device("meta"):
            model = Transformer(args)
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied weights once
        self._params: dict[int, tuple[ParamShard, ...]] = {}  # by pp (the planner asks for thousands of layouts)

    @cached_property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def check(self, layout: Layout, what: str = "") -> None:
        """Raise if `layout` cannot shard this model: heads, kv heads, ffn width or vocabulary
        not divisible by tp, or layers not divisible by pp."""
        a, what = self.args, what or f"layout {layout}"
        for field_name, value in (("attention heads", a.n_heads), ("kv heads", a.n_kv_heads),
                                  ("ffn width", a.ffn_dim), ("vocabulary", a.vocab_size)):
            if value % layout.tp:
                raise ValueError(f"{what}: {field_name} ({value}) not divisible by tp={layout.tp}")
        if a.n_layers % layout.pp:
            raise ValueError(f"{what}: {a.n_layers} layers not divisible by pp={layout.pp}")

    def stage_layers(self, pp: int, stage: int) -> range:
        per = self.args.n_layers // pp
        return range(stage * per, (stage + 1) * per)

    def canonical(self, name: str) -> str:
        """A tied LM head is the embedding: its parameter goes by the embedding's name."""
        return "tok_embeddings.weight" if name == "output.weight" and name not in self.shapes else name

    def param(self, name: str, pp: int) -> ParamShard:
        name = self.canonical(name)
        shape = self.shapes[name]
        if (m := _LAYER.match(name)) is not None:
            stages: tuple[int, ...] = (int(m[1]) // (self.args.n_layers // pp),)
        elif name.startswith("tok_embeddings."):
            # a tied LM head reads the embedding on the last stage too
            tied = self.args.tie_embeddings and self.args.head == "lm"
            stages = tuple(sorted({0, pp - 1})) if tied else (0,)
        else:  # final norm, LM head, value head
            stages = (pp - 1,)
        if _COLUMN.search(name) or _VOCAB.match(name):
            tp_dim: int | None = 0
        elif _ROW.search(name):
            tp_dim = 1
        else:
            tp_dim = None
        return ParamShard(name, shape, tp_dim, stages)

    def params(self, pp: int) -> tuple[ParamShard, ...]:
        if pp not in self._params:
            self._params[pp] = tuple(self.param(n, pp) for n in self.shapes)
        return self._params[pp]

    def local_slice(self, p: ParamShard, layout: Layout, rank: int) -> tuple[int, int, int] | None:
        """(dim, start, stop) of parameter `p` held by `rank` under `layout` (the full extent
        of dim 0 when replicated across tp), or None when the rank's stage does not hold it."""
        stage, _, t = layout.coord(rank)
        if stage not in p.stages:
            return None
        if p.tp_dim is None:
            return 0, 0, p.shape[0]
        size = p.shape[p.tp_dim] // layout.tp
        return p.tp_dim, t * size, (t + 1) * size

    def local_shapes(self, layout: Layout, rank: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for p in self.params(layout.pp):
            s = self.local_slice(p, layout, rank)
            if s is not None:
                dim, a, b = s
                out[p.name] = p.shape[:dim] + (b - a,) + p.shape[dim + 1:]
        return out

    def local_bytes(self, layout: Layout, rank: int) -> int:
        n = 0
        for shape in self.local_shapes(layout, rank).values():
            k = 1
            for s in shape:
                k *= s
            n += k
        return n * self.element_size

    def shard_state(self, full: dict[str, torch.Tensor], layout: Layout, rank: int) -> dict[str, torch.Tensor]:
        """The rank's local shards of a full state dict (views, no copies)."""
        out = {}
        for p in self.params(layout.pp):
            s = self.local_slice(p, layout, rank)
            if s is not None:
                dim, a, b = s
                out[p.name] = full[p.name].narrow(dim, a, b - a)
        return out
