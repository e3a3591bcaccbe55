"""Splitting a batch run across processes started by `accelerate launch` (GPUs, machines, or CPU
processes). Each process takes every world-th input of the same sorted list, so no image is done
twice or lost; the main process merges the per-process summaries."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

T = TypeVar("T")


@dataclass
class Shard:
    rank: int = 0
    world: int = 1
    device: str | None = None
    state: object = None

    @classmethod
    def current(cls) -> "Shard":
        """This process's place; accelerate is only asked when a launcher started several processes."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # Unlike Accelerator, PartialState does not read ACCELERATE_USE_CPU itself.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, str(state.device), state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        return list(items[self.rank::self.world])

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()
