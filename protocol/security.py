"""``--secure``: ZeroMQ CURVE on every socket of a job, and each peer's name bound to its key.

The launcher makes the job's keys (:func:`make_secrets`): one key pair the coordinator and every server serve with,
and one key pair per server and per worker, which they connect with. Each process gets only its own
:class:`Secrets` -- through its environment (``ZPS_SECRETS``, JSON), a 0600 file (``ZPS_SECRETS_FILE``), or a
directory of such files (``ZPS_SECRETS_DIR``, ``<role>-<rank>.json``): never on a command line.

The coordinator and the servers accept only the job's client keys, checked by a ZAP handler (:func:`authenticator`)
that also names the client: every message it sends then carries its peer name (``worker:3``) as ZeroMQ's
``User-Id``, and the receiver refuses a message whose ``src`` is another (:func:`check_sender`). So a process without
the job's keys gets no answer at all, and a worker cannot speak as another, nor register as a server.
"""
from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from . import transport
from .files import UntrustedFile, read_trusted
from .messages import ErrorCode, ProtocolError
from .peers import COORDINATOR, peer_name
from .variables import ZPS_RANK, ConfigError

ZAP_DOMAIN = "zps"
ENV_SECRETS = "ZPS_SECRETS"
ENV_SECRETS_FILE = "ZPS_SECRETS_FILE"
ENV_SECRETS_DIR = "ZPS_SECRETS_DIR"
OBSERVER = "observer"  # the read-only key: the coordinator answers it the job's STATUS, nothing else (zps top)


@dataclass(frozen=True)
class Secrets:
    """One process's keys (z85 text). ``server_*``: the pair the job's coordinator and servers serve with (its
    secret only in theirs); ``public``/``secret``: this process's own client pair; ``clients``: every client's public
    key and the peer name it speaks as (only the coordinator's and the servers')."""

    server_public: str
    name: str = COORDINATOR  # the peer this process is: ``worker:3``
    public: str = ""
    secret: str = ""
    server_secret: str = ""
    clients: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"server_public": self.server_public, "name": self.name, "public": self.public,
                           "secret": self.secret, "server_secret": self.server_secret, "clients": self.clients})

    @classmethod
    def from_json(cls, text: str, where: str) -> Secrets:
        try:
            data = json.loads(text)
            return cls(server_public=str(data["server_public"]), name=str(data["name"]),
                       public=str(data.get("public", "")),
                       secret=str(data.get("secret", "")), server_secret=str(data.get("server_secret", "")),
                       clients={str(k): str(v) for k, v in dict(data.get("clients", {})).items()})
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: not the job's secrets ({exc!r})") from None


def make_secrets(num_servers: int, num_workers: int) -> dict[str, Secrets]:
    """Fresh keys for one job: the coordinator's secrets (``"coordinator"``), each process's (``"worker-3"``) and
    the observer's (``"observer"``: a key the coordinator answers STATUS only, and the servers not at all)."""
    server_public, server_secret = (k.decode() for k in zmq.curve_keypair())
    pairs = {}
    for role, count in (("server", num_servers), ("worker", num_workers)):
        for rank in range(count):
            public, secret = (k.decode() for k in zmq.curve_keypair())
            pairs[f"{role}-{rank}"] = (peer_name(role, rank), public, secret)
    clients = {public: name for name, public, _ in pairs.values()}
    observer_public, observer_secret = (k.decode() for k in zmq.curve_keypair())
    out = {"coordinator": Secrets(server_public, server_secret=server_secret,
                                  clients={**clients, observer_public: OBSERVER})}
    for label, (name, public, secret) in pairs.items():
        serves = label.startswith("server")
        out[label] = Secrets(server_public, name, public, secret, server_secret if serves else "",
                             clients if serves else {})
    out[OBSERVER] = Secrets(server_public, OBSERVER, observer_public, observer_secret)
    return out


def secrets_label(role: str, rank: int) -> str:
    """The name of a process's secrets in :func:`make_secrets` and in a secrets directory: ``worker-3``."""
    return role if role in ("coordinator", OBSERVER) else f"{role}-{rank}"


def write_secrets(directory: str | os.PathLike[str], secrets: Mapping[str, Secrets]) -> Path:
    """One 0600 file per process in ``directory`` (made 0700): ``ZPS_SECRETS_DIR`` for ``zps node`` and Slurm."""
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(root)
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():  # (one planted by another user: never written)
        raise UntrustedFile(f"{root} is a link or belongs to another user (uid {info.st_uid})")
    os.chmod(root, 0o700)
    for label, value in secrets.items():
        path = root / f"{label}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value.to_json())
    return root


def load_secrets(env: Mapping[str, str], role: str, rank: int) -> Secrets:
    """This process's secrets from ``env`` (``ZPS_SECRETS``, ``ZPS_SECRETS_FILE`` or ``ZPS_SECRETS_DIR``);
    ConfigError saying what is missing. A file others can read, or its group can write, is refused, and so is one
    another user owns or could have put there (:mod:`.files`: a directory other users can write)."""
    if env.get(ENV_SECRETS):
        return Secrets.from_json(env[ENV_SECRETS], ENV_SECRETS)
    path = env.get(ENV_SECRETS_FILE)
    if not path and env.get(ENV_SECRETS_DIR):
        if role != "coordinator" and rank < 0:
            raise ConfigError(f"{ENV_SECRETS_DIR} holds a file per process: this {role} needs its rank ({ZPS_RANK})")
        path = os.path.join(env[ENV_SECRETS_DIR], secrets_label(role, rank) + ".json")
    if not path:
        raise ConfigError(f"--secure needs this process's keys: set {ENV_SECRETS}, {ENV_SECRETS_FILE} or "
                          f"{ENV_SECRETS_DIR} (zps run and zps launch do; `zps secrets` writes them)")
    try:  # this user's (or root's) file in a directory no other user can write: nobody could have swapped it
        text = read_trusted(path, private=True).decode("utf-8", "replace")  # (a pod's fsGroup may add group read)
    except UntrustedFile as exc:
        raise ConfigError(f"the job's secrets: {exc}; it holds secret keys") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the job's secrets from {path}: {exc.strerror}") from None
    return Secrets.from_json(text, path)


def secure_server(sock: zmq.Socket, secrets: Secrets) -> None:
    """Make ``sock`` (a ROUTER, before it binds) accept only CURVE clients the ZAP handler lets in."""
    sock.curve_server = True
    sock.curve_secretkey = secrets.server_secret.encode()
    sock.curve_publickey = secrets.server_public.encode()
    sock.zap_domain = ZAP_DOMAIN.encode()


def secure_client(sock: zmq.Socket, secrets: Secrets) -> None:
    """Make ``sock`` (a DEALER, before it connects) speak CURVE with this process's own keys."""
    sock.curve_serverkey = secrets.server_public.encode()
    sock.curve_publickey = secrets.public.encode()
    sock.curve_secretkey = secrets.secret.encode()


_authenticators: dict[int, tuple[zmq.Context, Any]] = {}
_lock = threading.Lock()


def authenticator(context: zmq.Context, secrets: Secrets) -> Any:
    """The ZAP handler of ``context`` (started once per context): only the job's client keys get in, each named
    after its process."""
    if not secrets.clients:
        raise ConfigError("these secrets are a client's: a process that serves needs the job's client keys")
    with _lock:
        held = _authenticators.get(id(context))
        if held is not None and held[0] is context:
            held[1].clients.update(secrets.clients)  # (one process, one job: the same keys)
            return held[1]
        auth = _authenticator_class()(context, secrets.clients)
        auth.start()
        auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_Keys(auth.clients))
        _authenticators[id(context)] = (context, auth)
        return auth


def _authenticator_class() -> type:
    """pyzmq's ZAP thread, naming each client after its key (imported here: it brings asyncio, slow to import)."""
    from zmq.auth.thread import ThreadAuthenticator

    class Named(ThreadAuthenticator):
        def __init__(self, context: zmq.Context, clients: Mapping[str, str]) -> None:
            super().__init__(context)
            self.clients = dict(clients)

        def curve_user_id(self, client_public_key: bytes) -> str:
            return self.clients.get(z85.encode(client_public_key).decode(), "")

    return Named


def router(context: zmq.Context, secrets: Secrets | None) -> zmq.Socket:
    """A ROUTER to serve from (before it binds): with ``secrets``, CURVE, answering only the job's keys."""
    sock = transport.configure(context.socket(zmq.ROUTER))
    if secrets is not None:
        authenticator(context, secrets)
        secure_server(sock, secrets)
    return sock


def dealer(context: zmq.Context, secrets: Secrets | None) -> zmq.Socket:
    """A DEALER to connect with (before it connects): with ``secrets``, CURVE with this process's key."""
    sock = transport.configure(context.socket(zmq.DEALER))
    if secrets is not None:
        secure_client(sock, secrets)
    return sock


class _Keys:
    def __init__(self, clients: Mapping[str, str]) -> None:
        self.clients = clients

    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode() in self.clients


def check_sender(frame: Any, src: str) -> None:
    """With ``--secure``: the message's ``src`` must be the peer its key names (``frame``: its first part)."""
    try:
        user = frame.get("User-Id")
    except (AttributeError, zmq.ZMQError):
        user = None
    if user != src:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"this key speaks as {user!r}, not as {str(src)[:40]!r}")
