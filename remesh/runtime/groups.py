"""The process groups of an execution plan, created once, up front, in the same order on every
rank (torch.distributed requires every rank to take part in creating every group, so groups
cannot be made lazily by the ranks of one MFC while others run another)."""

from __future__ import annotations

import torch.distributed as dist

from remesh.plan.layout import Layout


class ProcessGroups:
    def __init__(self, groups: list[tuple[int, ...]]):
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        world = dist.get_world_size()
        for ranks in sorted(set(tuple(sorted(g)) for g in groups)):
            if len(ranks) == world:
                self._groups[ranks] = dist.group.WORLD
            elif len(ranks) > 1:
                self._groups[ranks] = dist.new_group(list(ranks))

    @classmethod
    def for_layouts(cls, layouts: list[Layout]) -> ProcessGroups:
        """Every mesh and its tp, dp and pp groups."""
        groups: list[tuple[int, ...]] = []
        for layout in layouts:
            groups.append(layout.ranks)
            groups.extend(layout.groups())
        return cls(groups)

    def get(self, ranks: tuple[int, ...] | list[int]) -> dist.ProcessGroup | None:
        """The group of exactly these ranks; None for a single rank (nothing to communicate)."""
        key = tuple(sorted(ranks))
        if len(key) == 1:
            return None
        if key not in self._groups:
            raise KeyError(f"no process group for ranks {key}: it was not created up front "
                           f"(known: {sorted(self._groups)})")
        return self._groups[key]
