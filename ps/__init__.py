"""zps parameter server: the shard store, consistency modes (BSP/ASP/SSP), torch.optim on the server."""
from .server import Server, serve

__all__ = ["Server", "serve"]
