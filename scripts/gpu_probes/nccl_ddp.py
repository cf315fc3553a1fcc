"""nccl on this GPU, under ``torchrun --standalone --nproc-per-node 1``: a one-rank group (energytools
makes none for one process) with all_reduce, all_gather, broadcast and barrier on cuda tensors,
and DDP whose gradients accumulated under ``no_sync`` and then all-reduced equal a plain model's.

    torchrun --standalone --nproc-per-node 1 scripts/gpu_probes/nccl_ddp.py RESULT.json
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
    figures = {"backend": dist.get_backend(), "world": world,
               "nccl": ".".join(map(str, version)) if isinstance(version, tuple) else str(version)}

    summed = torch.arange(4, dtype=torch.float32, device=device)
    dist.all_reduce(summed)
    figures["all_reduce_ok"] = torch.equal(summed.cpu(), torch.arange(4, dtype=torch.float32) * world)
    gathered = torch.empty(4 * world, device=device)
    dist.all_gather_into_tensor(gathered, torch.arange(4, dtype=torch.float32, device=device))
    figures["all_gather_ok"] = torch.equal(gathered.cpu(), torch.arange(4, dtype=torch.float32).repeat(world))
    sent = torch.full((3,), 7.0, device=device)
    dist.broadcast(sent, src=0)
    figures["broadcast_ok"] = sent.cpu().tolist() == [7.0] * 3
    dist.barrier()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
    plain.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model, device_ids=[local_rank])
    first, second = torch.randn(8, 16, device=device), torch.randn(8, 16, device=device)
    with ddp.no_sync():  # gradients stay local
        ddp(first).square().mean().backward()
    ddp(second).square().mean().backward()  # this backward all-reduces the accumulated sum
    plain(first).square().mean().backward()
    plain(second).square().mean().backward()
    differences = [(a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), plain.parameters())]
    figures["ddp_no_sync_max_grad_difference"] = max(differences)
    torch.cuda.synchronize()
    dist.destroy_process_group()
    with open(sys.argv[1], "w") as handle:
        json.dump(figures, handle)
    print(f"nccl-ddp: {figures}", flush=True)


if __name__ == "__main__":
    main()
