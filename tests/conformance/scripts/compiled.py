"""A model under torch.compile (inductor), the plain loop."""
import torch
from port import Port, parse, regression_data
from torch import nn
from torch.utils.data import DataLoader

args = parse(lambda p: p.add_argument("--epochs", type=int, default=1))
port = Port(args.backend)
torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
net, opt = port.wrap(model, torch.optim.AdamW(model.parameters(), lr=0.01))
compiled = torch.compile(net)
data = regression_data(args.seed, 96, 8, 3)
sampler = port.sampler(data, seed=args.seed)
loader = DataLoader(data, batch_size=8, sampler=sampler)
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.mse_loss(compiled(x), y).backward()
        opt.step()
port.finish(model, args.out)
