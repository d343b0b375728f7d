"""Run by tests/test_train.py under torchrun (2 ranks) and as one process: train a fixed batch
for a few optimizer steps with train.py's own loop, make the ranks' buffers rank 0's
(train.sync_buffers, as train.py does before evaluating and saving), and save the state."""
import sys

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import train


def main(out, arch, per_rank_batch, accum, steps):
    rank, world, device = train.setup_distributed()
    micro = per_rank_batch // accum
    cfg = train.parse_config(['--arch', arch, '--depth', '2', '--embed-dim', '48', '--num-heads', '3',
                              '--drop-path', '0', '--smoothing', '0', '--batch-size', str(micro),
                              '--accum', str(accum), '--opt', 'sgd', '--lr', '0.5', '--epochs', '1',
                              '--warmup-epochs', '0', '--min-lr', '0.5', '--workers', '0',
                              '--max-steps', str(steps)] +
                             (['--local-up-to-layer', '1'] if 'convit' in arch else []))
    torch.manual_seed(0)
    model = train.build_model(cfg, 10)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    joint = per_rank_batch * world                  # the joint batch of every optimizer step
    images, labels = torch.randn(steps * joint, 3, 32, 32, generator=g), torch.randint(0, 10, (steps * joint,), generator=g)
    # step s: rank r takes samples [s*joint + r*per_rank_batch, ... + per_rank_batch)
    mine = [s * joint + rank * per_rank_batch + i for s in range(steps) for i in range(per_rank_batch)]
    loader = DataLoader(Subset(TensorDataset(images, labels), mine), batch_size=micro)
    optimizer = train.build_optimizer(cfg, model, joint)
    schedule = train.Schedule(cfg, steps, optimizer.param_groups[0]['lr'])
    train.train_one_epoch(model, loader, optimizer, schedule, cfg, device, 0,
                          torch.nn.CrossEntropyLoss())
    before = {k: v.clone() for k, v in train.unwrap(model).state_dict().items()}
    train.sync_buffers(train.unwrap(model))
    torch.save({'before_sync': before, 'after_sync': train.unwrap(model).state_dict()},
               f'{out}.rank{rank}.pt')
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
