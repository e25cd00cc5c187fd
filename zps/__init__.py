"""zps: a parameter server for PyTorch.

The packages live at the top of the repository (``protocol/``, ``ps/``, ``worker/``, ``launcher/``) and are
installed under this one namespace, so a user's ``worker.py`` or ``ps.py`` can never shadow them::

    from zps import worker          # the client library a training script imports
    from zps.protocol import Config
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zps")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
