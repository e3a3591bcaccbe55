"""`diffplugin` for accelerate launch, reporting how many DDP wrappers are alive when training ends.

DDP's reducer must not hold the process group's last reference at exit: dropping it there, with
the GIL held, can deadlock against gloo's worker threads (a 2-process run hung so once)."""

import gc
import sys

import accelerate
from torch.nn.parallel import DistributedDataParallel

from diffplugin_cli.cli import main

_end_training = accelerate.Accelerator.end_training


def _reporting_end_training(self):
    alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
    print(f"rank {self.process_index}: DDP wrappers alive at end_training: {alive}", file=sys.stderr, flush=True)
    _end_training(self)


if __name__ == "__main__":
    accelerate.Accelerator.end_training = _reporting_end_training
    sys.argv[0] = "diffplugin"
    main()
