"""zps wire protocol: messages, validation, sharding plan, configuration, rendezvous client, codecs."""
from .config import Config, ConfigError, JobConfig
from .messages import PROTOCOL_VERSION, ErrorCode, Kind, Message, ProtocolError
from .plan import Chunk, ParamSpec, Plan, make_plan
from .rendezvous import RendezvousClient, RendezvousError, Topology

__all__ = [
    "PROTOCOL_VERSION",
    "Chunk",
    "Config",
    "ConfigError",
    "JobConfig",
    "ErrorCode",
    "Kind",
    "Message",
    "ParamSpec",
    "Plan",
    "ProtocolError",
    "RendezvousClient",
    "RendezvousError",
    "Topology",
    "make_plan",
]
