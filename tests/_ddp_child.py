"""Run by ``torchrun --nproc_per_node 2``: a few steps of every toy trainer, then each process
writes its world size and final parameters for the parent test to compare.

    torchrun --nproc_per_node 2 tests/_ddp_child.py OUT_DIR STEPS BATCH [KIND,KIND]

and then sample a few images with ``fewstep.generate`` split over the two processes.
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import _train_child as child  # noqa: E402

import fewstep  # noqa: E402

GENERATE = dict(labels=torch.arange(5), solver="ddim", steps=2, batch_size=2, seed=7)

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, steps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    kinds = sys.argv[4].split(",") if len(sys.argv) > 4 else child.KINDS
    for kind in kinds:
        result = child.run(kind, out / kind, steps, batch_size=batch, ckpt_every_steps=None)
        rank = torch.distributed.get_rank()
        params = {f"{name}.{k}": v.detach().contiguous() for name, m in result.models.items()
                  for k, v in m.state_dict().items()}
        params["world_size"] = torch.tensor(torch.distributed.get_world_size())
        save_file(params, str(out / f"{kind}-rank{rank}.safetensors"))
    if len(sys.argv) > 4:
        sys.exit(0)
    images = fewstep.generate("mnist-teacher", **GENERATE)
    save_file({"images": images}, str(out / f"generate-rank{torch.distributed.get_rank()}.safetensors"))
