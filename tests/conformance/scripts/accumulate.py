"""Gradient accumulation: two micro-batches per step, the first one's forward and backward under no_sync() (DDP's
way: it sends nothing; DDP decides in forward, so the forward belongs inside), a BatchNorm in the model.
--overlap: zps sends gradients during backward."""
import torch
from port import Port, parse, regression_data
from torch import nn
from torch.utils.data import DataLoader

args = parse(lambda p: (p.add_argument("--epochs", type=int, default=2),
                        p.add_argument("--overlap", action="store_true")))
Port.zps_options = {"overlap": args.overlap}
port = Port(args.backend)
torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
net, opt = port.wrap(model, torch.optim.AdamW(model.parameters(), lr=0.01))
data = regression_data(args.seed, 96, 8, 3)
sampler = port.sampler(data, seed=args.seed)
loader = DataLoader(data, batch_size=4, sampler=sampler)
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for i, (x, y) in enumerate(loader):
        if i % 2 == 0:
            with port.no_sync():
                (nn.functional.mse_loss(net(x), y) / 2).backward()
            continue
        (nn.functional.mse_loss(net(x), y) / 2).backward()
        opt.step()
        opt.zero_grad()
port.finish(model, args.out)
