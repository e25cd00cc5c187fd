"""``python -m zps.ps``: run one parameter server configured by ``ZPS_*`` variables (``zps node`` does the same)."""
import sys

from zps.protocol.config import Config, ConfigError, configure_logging

from .server import serve

try:
    config = Config.from_env()
except ConfigError as exc:
    sys.exit(f"zps server: {exc}")
configure_logging(config.job.log_level)
sys.exit(serve(config))
