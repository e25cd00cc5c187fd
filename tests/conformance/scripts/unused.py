"""Parameters without a gradient: a branch only some ranks and steps use, a frozen layer still in the optimizer, a
layer never used. AdamW with weight decay would move all of them if they were stepped (DDP with
find_unused_parameters: only what some rank used is)."""
import torch
from port import Port, parse, regression_data
from torch import nn
from torch.utils.data import DataLoader


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.branch = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16)
        self.never = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.frozen(torch.tanh(self.body(x))))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


args = parse(lambda p: p.add_argument("--epochs", type=int, default=2))
port = Port(args.backend)
torch.manual_seed(args.seed)
model = Net()
net, opt = port.wrap(model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1),
                     find_unused_parameters=True)
data = regression_data(args.seed, 96, 8, 3)
sampler = port.sampler(data, seed=args.seed)
loader = DataLoader(data, batch_size=8, sampler=sampler)
step = 0
resumed = port.on_checkpoint(lambda: {"step": step})
if resumed is not None:
    step = resumed["step"]
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        opt.zero_grad()
        use = step % 3 == 0 or (port.rank == 0 and step % 2 == 0)  # by every rank, by some, by none
        nn.functional.mse_loss(net(x, use), y).backward()
        opt.step()
        step += 1
port.finish(model, args.out)
