"""``python -m zps.ps``: run one parameter server configured by ``ZPS_*`` variables."""
import sys

from .server import main

sys.exit(main())
