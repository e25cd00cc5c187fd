"""zps parameter server: the shard store, consistency modes (BSP/ASP/SSP), torch.optim on the server."""
from .consistency import MODES
from .server import Server, main

__all__ = ["MODES", "Server", "main"]
