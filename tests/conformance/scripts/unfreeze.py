"""Progressive unfreezing: the first layer is frozen (requires_grad False) for the first steps, then trained."""
import torch
from port import Port, parse, regression_data
from torch import nn
from torch.utils.data import DataLoader

args = parse(lambda p: p.add_argument("--epochs", type=int, default=2))
port = Port(args.backend)
torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
net, opt = port.wrap(model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05),
                     find_unused_parameters=True)
model[0].requires_grad_(False)
data = regression_data(args.seed, 96, 8, 3)
sampler = port.sampler(data, seed=args.seed)
loader = DataLoader(data, batch_size=8, sampler=sampler)
step = 0
resumed = port.on_checkpoint(lambda: {"step": step})
if resumed is not None:
    step = resumed["step"]
    model[0].requires_grad_(step > 5)
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        if step == 5:
            model[0].requires_grad_(True)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        step += 1
port.finish(model, args.out)
