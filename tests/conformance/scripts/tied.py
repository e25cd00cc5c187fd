"""Tied parameters: an embedding and the output layer share one weight (a language model's tied embeddings);
non-contiguous (channels_last) convolution weights."""
import torch
from port import Port, parse
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.mix = nn.Linear(16, 8)
        self.out = nn.Linear(8, 32, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (batch, 8, 8): eight tokens of eight features, as a 2-channel image
        h = self.conv(h.reshape(-1, 2, 4, 8).contiguous(memory_format=torch.channels_last))  # (b, 4, 4, 8)
        h = self.mix(h.reshape(-1, 8, 16))
        return self.out(torch.tanh(h))


args = parse()
port = Port(args.backend)
torch.manual_seed(args.seed)
model = Net()
model.conv.weight.data = model.conv.weight.data.contiguous(memory_format=torch.channels_last)
assert not model.conv.weight.is_contiguous()
net, opt = port.wrap(model, torch.optim.Adam(model.parameters(), lr=0.01))
step = 0
resumed = port.on_checkpoint(lambda: {"step": step})
if resumed is not None:
    step = resumed["step"]
while step < args.steps:  # a loop of its own: each step's batch is a function of the step
    g = torch.Generator().manual_seed(1000 * args.seed + step)
    ids = torch.randint(0, 32, (port.world, 4, 8), generator=g)[port.rank]
    opt.zero_grad()
    logits = net(ids)
    nn.functional.cross_entropy(logits.reshape(-1, 32), ids.roll(1, dims=1).reshape(-1)).backward()
    opt.step()
    step += 1
port.finish(model, args.out)
