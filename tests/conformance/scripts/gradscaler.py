"""Mixed precision's loss scaling: torch.amp.GradScaler, unchanged. Worker 1's first batches overflow (its inputs
are huge), worker 0's do not: DDP skips those steps on every rank, since the averaged gradient holds infs, and every
rank's scale backs off the same way. With --clip the AMP recipe that clips: unscale_, clip, step."""
import torch
from port import Port, parse, regression_data
from torch import nn
from torch.utils.data import DataLoader

args = parse(lambda p: (p.add_argument("--epochs", type=int, default=2),
                        p.add_argument("--clip", action="store_true")))
port = Port(args.backend)
torch.manual_seed(args.seed)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
net, opt = port.wrap(model, torch.optim.Adam(model.parameters(), lr=0.01))
scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=3)
scales: list[float] = []
step = 0
resumed = port.on_checkpoint(lambda: {"scaler": scaler.state_dict(), "scales": scales, "step": step})
if resumed is not None:
    scaler.load_state_dict(resumed["scaler"])
    scales, step = resumed["scales"], resumed["step"]
data = regression_data(args.seed, 96, 8, 3)
sampler = port.sampler(data, seed=args.seed)
loader = DataLoader(data, batch_size=8, sampler=sampler)
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        if port.rank == 1 and step in (1, 2, 6):
            x = x * 1e30  # this worker's loss overflows: inf / nan gradients
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(net(x), y)).backward()
        if args.clip:
            scaler.unscale_(opt)
            port.clip_grad_norm_(model, 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        step += 1
port.finish(model, args.out, {"scales": torch.tensor(scales, dtype=torch.float64)})
