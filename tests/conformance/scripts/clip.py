"""Gradient clipping by the global norm (the ported word_language_model clips at 0.25), SGD with momentum; rank 0
also keeps the norm clip_grad_norm_ returned at each step."""
import torch
from port import Port, parse, regression_data
from torch import nn
from torch.utils.data import DataLoader

args = parse(lambda p: p.add_argument("--epochs", type=int, default=2))
port = Port(args.backend)
torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
net, opt = port.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
data = regression_data(args.seed, 96, 8, 3)
sampler = port.sampler(data, seed=args.seed)
loader = DataLoader(data, batch_size=8, sampler=sampler)
norms: list[float] = []
resumed = port.on_checkpoint(lambda: {"norms": norms})
if resumed is not None:
    norms = resumed["norms"]
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), 10 * y).backward()
        norms.append(port.clip_grad_norm_(model, 0.25).item())
        opt.step()
port.finish(model, args.out, {"norms": torch.tensor(norms, dtype=torch.float64)})
