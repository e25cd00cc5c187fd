"""Schedulers that change more than the learning rate: OneCycleLR cycles Adam's beta1 (and SGD's momentum), and
the script itself ramps weight decay between steps."""
import torch
from port import Port, parse, regression_data
from torch import nn
from torch.utils.data import DataLoader

args = parse(lambda p: (p.add_argument("--epochs", type=int, default=2),
                        p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")))
port = Port(args.backend)
torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
inner: torch.optim.Optimizer
if args.optimizer == "adam":
    inner = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
else:
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.0)
net, opt = port.wrap(model, inner)
data = regression_data(args.seed, 96, 8, 3)
sampler = port.sampler(data, seed=args.seed)
loader = DataLoader(data, batch_size=8, sampler=sampler)
steps = args.epochs * len(loader)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)  # cycle_momentum=True
resumed = port.on_checkpoint(lambda: {"sched": sched.state_dict()})
if resumed is not None:
    sched.load_state_dict(resumed["sched"])
step = 0
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()
        for group in opt.param_groups:  # the script's own schedule of another hyper-parameter
            group["weight_decay"] = 0.01 * (1 + sched.last_epoch % 3)
port.finish(model, args.out)
