"""A zps training script run as ``python alone.py``, with no launcher: it runs as the only worker, its optimizer
stepped in this process. Beside it, the same loop with plain torch; prints SAME when both models hold the same bits
(a scheduler, opt.clip_grad_norm_, a GradScaler that skips a step, no_sync, a zps sampler)."""
import copy

import torch
from torch.utils.data import DataLoader, TensorDataset

from zps import worker

client = worker.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
twin = copy.deepcopy(model)
opt = worker.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), model)
ref = torch.optim.AdamW(twin.parameters(), lr=0.01)
scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20) for o in (opt, ref)]
scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) for _ in range(2)]
data = TensorDataset(torch.randn(40, 4), torch.randn(40, 2))
sampler = worker.shard_sampler(data)
assert len(sampler) == 40 and client.rank == 0 and worker.num_workers() == 1
for step, (x, y) in enumerate(DataLoader(data, batch_size=4, sampler=sampler)):
    if step == 3:
        x = x * 1e30  # overflows: both scalers skip this step
    for net, o, sched, scaler in ((model, opt, scheds[0], scalers[0]), (twin, ref, scheds[1], scalers[1])):
        o.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
        scaler.unscale_(o)
        if o is opt:
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        scaler.step(o)
        scaler.update()
        sched.step()
opt.synchronize()
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))
print("SAME" if same and opt.steps == 10 and scalers[0].get_scale() == scalers[1].get_scale() else "DIFFERENT")
worker.shutdown()
