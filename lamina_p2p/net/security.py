"""Who may talk to a peer: ZeroMQ CURVE keys, the ZAP check of client keys, loopback-only plain text.

Key material (written by `lamina-node keygen --out DIR`, ZeroMQ's own certificate format, so
`zmq.auth.load_certificate` and other ZeroMQ tools read it):

  DIR/cluster.key_secret   the cluster secret: a CURVE key pair every member holds (mode 0600).
                           Every peer's ROUTER is a CURVE server with this key pair, and every
                           DEALER authenticates with it, so holding this one file is membership.
  DIR/cluster.key          its public half (harmless on its own: it cannot join).
  DIR/peers/NAME.key_secret   with `--peer NAME` (repeatable): a key pair of one peer ...
  DIR/allow/NAME.key          ... and its public key, for an allow-list directory.

Two modes, both on top of the cluster secret (which every peer needs, because a client must know
the server's public key and every peer serves with the cluster key pair):

  --secret DIR/cluster.key_secret
        clients authenticate with the cluster key pair; servers accept exactly that public key.
  --secret DIR/cluster.key_secret --peer-key DIR/peers/NAME.key_secret --allow DIR/allow
        clients authenticate with their own key pair; servers accept only public keys found in
        DIR/allow (the cluster key is then *not* accepted as a client key). Removing NAME.key from
        the allow directories of the peers shuts NAME out.

Servers check client keys with a ZAP handler (RFC 27) bound on the peer's ZeroMQ context before
any CURVE socket binds: libzmq accepts every CURVE client when no ZAP handler is listening, so the
handler must be up first and stay up as long as any secured server of that context.

Without keys nothing is encrypted, so a peer binds to loopback only unless told
`--insecure-listen` (see `check_listen`).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
CLUSTER_NAME = "cluster"


class SecurityError(ValueError):
    """Key files missing, unreadable or inconsistent; or an insecure listen address."""


@dataclass(frozen=True)
class Security:
    """CURVE settings of one peer process. Keys are z85 text as bytes (40 chars)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    allowed: frozenset  # z85 public keys a server accepts from clients
    # Where the keys came from, so a launcher can hand the same flags to peers it starts.
    args: tuple = field(default=(), compare=False)

    def cli_args(self) -> list[str]:
        return list(self.args)


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise SecurityError("this pyzmq/libzmq was built without CURVE (libsodium): keys cannot be used")


def _load_pair(path: str | os.PathLike, what: str) -> tuple[bytes, bytes]:
    p = Path(path)
    if not p.is_file():
        raise SecurityError(f"{what} {p}: no such file (create one with `lamina-node keygen --out DIR`)")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except Exception as e:  # malformed file
        raise SecurityError(f"{what} {p}: not a ZeroMQ certificate: {e}") from None
    if not secret:
        raise SecurityError(f"{what} {p} holds no secret key (did you pass the public .key file? "
                            "use the .key_secret one)")
    if zmq.curve_public(secret) != public:
        raise SecurityError(f"{what} {p}: its public and secret keys do not belong together")
    return public, secret


def load_allow_dir(path: str | os.PathLike) -> frozenset:
    p = Path(path)
    if not p.is_dir():
        raise SecurityError(f"allow-list {p}: not a directory")
    keys = set()
    for f in sorted(p.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(f))
        except Exception as e:
            raise SecurityError(f"allow-list {f}: not a ZeroMQ certificate: {e}") from None
        keys.add(public)
    if not keys:
        raise SecurityError(f"allow-list {p}: no *.key files: nobody could connect")
    return frozenset(keys)


def load_security(secret: str | None, peer_key: str | None = None, allow: str | None = None) -> Security | None:
    """Security from the CLI's --secret/--peer-key/--allow; None when no --secret (plain text)."""
    if secret is None:
        if peer_key or allow:
            raise SecurityError("--peer-key and --allow need --secret (the cluster key pair) too")
        return None
    if bool(peer_key) != bool(allow):
        raise SecurityError("--peer-key and --allow go together: an allow-list needs per-peer keys")
    _require_curve()
    server_public, server_secret = _load_pair(secret, "cluster secret")
    args = ["--secret", str(Path(secret).resolve())]
    if peer_key:
        client_public, client_secret = _load_pair(peer_key, "peer key")
        allowed = load_allow_dir(allow)
        args += ["--peer-key", str(Path(peer_key).resolve()), "--allow", str(Path(allow).resolve())]
    else:
        client_public, client_secret = server_public, server_secret
        allowed = frozenset([server_public])
    return Security(server_public, server_secret, client_public, client_secret, allowed, tuple(args))


def _write_cert(path: Path, comment: str, public: bytes, secret: bytes | None = None) -> None:
    """ZeroMQ's certificate format (ZPL), as zmq.auth.load_certificate reads it."""
    lines = [f"#   {comment}", "#   ZeroMQ CURVE " + ("**Secret** " if secret else "Public ") + "Certificate",
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    path.write_text("\n".join(lines) + "\n")


def _write_pair(directory: Path, name: str, public: bytes, secret: bytes) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    pub, sec = directory / f"{name}.key", directory / f"{name}.key_secret"
    if sec.exists():
        raise SecurityError(f"{sec} exists: refusing to overwrite a key (remove it first)")
    _write_cert(pub, f"lamina-p2p public key {name}", public)
    # The secret file is created private, never world-readable even for an instant.
    fd = os.open(sec, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    _write_cert(sec, f"lamina-p2p SECRET key {name}: keep it private", public, secret)
    os.chmod(sec, 0o600)
    return pub, sec


def generate_keys(out: str | os.PathLike, peers: list[str] = ()) -> dict:
    """Write the cluster key pair (unless DIR has one) and one key pair per named peer."""
    _require_curve()
    out = Path(out)
    written: dict = {"peers": {}}
    cluster_secret = out / f"{CLUSTER_NAME}.key_secret"
    if cluster_secret.exists():
        _load_pair(cluster_secret, "cluster secret")  # keep it, but only if it is sound
        written["cluster"] = str(cluster_secret)
    else:
        written["cluster"] = str(_write_pair(out, CLUSTER_NAME, *zmq.curve_keypair())[1])
    for name in peers:
        if not name or "/" in name or name.startswith("."):
            raise SecurityError(f"bad peer name {name!r}")
        public, secret = zmq.curve_keypair()
        _, sec = _write_pair(out / "peers", name, public, secret)
        (out / "allow").mkdir(exist_ok=True)
        _write_cert(out / "allow" / f"{name}.key", f"lamina-p2p public key {name}", public)
        written["peers"][name] = str(sec)
    return written


# --- sockets ------------------------------------------------------------------------------------

def apply(sock: zmq.Socket, security: Security | None, server: bool) -> None:
    """Configure CURVE on a socket before it binds/connects (no-op without security)."""
    if security is None:
        return
    if not isinstance(security, Security):
        raise TypeError(f"security must be a Security, got {type(security).__name__}")
    if server:
        sock.curve_secretkey = security.server_secret
        sock.curve_publickey = security.server_public
        sock.zap_domain = b"lamina"
        sock.curve_server = True
    else:
        sock.curve_serverkey = security.server_public
        sock.curve_publickey = security.client_public
        sock.curve_secretkey = security.client_secret


class _Zap(threading.Thread):
    """ZAP handler of one context: accepts CURVE clients whose public key is allowed."""

    def __init__(self, ctx: zmq.Context):
        super().__init__(daemon=True, name="lamina-zap")
        self._sync = zmq.Context.shadow(ctx.underlying)
        self.allowed: set[bytes] = set()
        self.refused = 0
        self.users = 0
        self._stop_ev = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._logged: set = set()

    def run(self) -> None:
        try:
            sock = self._sync.socket(zmq.REP)
            sock.linger = 0
            sock.bind(ZAP_ENDPOINT)
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop_ev.is_set():
                if not sock.poll(100):
                    continue
                try:
                    self._handle(sock, sock.recv_multipart())
                except zmq.ZMQError as e:
                    if e.errno == zmq.ETERM:
                        return
                    log.warning("zap: %s", e)
        except zmq.ZMQError:
            return  # the context was destroyed under us
        finally:
            try:
                sock.close(linger=0)
            except Exception:
                pass

    def _handle(self, sock: zmq.Socket, msg: list[bytes]) -> None:
        # A REP socket must answer every request, malformed ones included, or it stops serving.
        request_id = msg[1] if len(msg) > 1 else b""
        ok, text, user = False, "refused", b""
        if len(msg) < 6 or msg[0] != b"1.0":
            text = "malformed ZAP request"
            log.warning("zap: malformed request with %d frames", len(msg))
        elif msg[5] != b"CURVE" or len(msg) < 7 or len(msg[6]) != 32:
            text = "only CURVE clients are accepted"
        else:
            address, key = msg[3], z85.encode(msg[6])
            ok = key in self.allowed
            if ok:
                text, user = "OK", key
            else:
                self.refused += 1
                text = "client key not allowed"
                if (key, address) not in self._logged and len(self._logged) < 1000:
                    self._logged.add((key, address))
                    log.warning("refused CURVE client %s from %s: key not on the allow-list",
                                key.decode(), address.decode(errors="replace"))
        sock.send_multipart([b"1.0", request_id, b"200" if ok else b"400", text.encode(), user, b""])

    def start_and_wait(self) -> None:
        self.start()
        self._ready.wait()
        if self._error is not None:
            raise SecurityError(f"cannot start the ZAP handler: {self._error}") from self._error

    def stop(self) -> None:
        self._stop_ev.set()
        if threading.current_thread() is not self:
            self.join(timeout=2.0)


_zaps: dict[int, tuple[weakref.ref, _Zap]] = {}
_zaps_lock = threading.Lock()


def _live_zap(ctx: zmq.Context) -> _Zap | None:
    """ctx's running handler; not a dead one, nor one of a destroyed context at the same address."""
    entry = _zaps.get(id(ctx))
    if entry is None:
        return None
    ref, zap = entry
    if ref() is not ctx or ctx.closed or not zap.is_alive() or zap._stop_ev.is_set():
        del _zaps[id(ctx)]
        return None
    return zap


def acquire_zap(ctx: zmq.Context, security: Security) -> _Zap:
    """Start (or share) the ZAP handler of ctx and allow security's client keys on it.

    All secured servers of one context share a handler (ZeroMQ allows one per context); the keys
    they allow are pooled, which is right because one process has one Security.
    """
    with _zaps_lock:
        zap = _live_zap(ctx)
        if zap is None:
            zap = _Zap(ctx)
            zap.start_and_wait()
            _zaps[id(ctx)] = (weakref.ref(ctx), zap)
        zap.allowed.update(security.allowed)
        zap.users += 1
        return zap


def release_zap(ctx: zmq.Context) -> None:
    with _zaps_lock:
        zap = _live_zap(ctx)
        if zap is None:
            return
        zap.users -= 1
        if zap.users > 0:
            return
        del _zaps[id(ctx)]
    zap.stop()


# --- listen addresses ---------------------------------------------------------------------------

def is_loopback_endpoint(endpoint: str) -> bool:
    """True for tcp://127.x.x.x:P, tcp://[::1]:P and tcp://localhost:P (and ipc/inproc)."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or interface name: could be anything


def check_listen(endpoint: str, security: Security | None, insecure_listen: bool) -> None:
    """Refuse a plain-text bind beyond loopback unless the user said --insecure-listen."""
    if security is None and not insecure_listen and not is_loopback_endpoint(endpoint):
        raise SecurityError(
            f"refusing to listen on {endpoint} without encryption: anyone who can reach it could join the "
            "cluster and send work. Give --secret FILE (see `lamina-node keygen`), listen on loopback "
            "(tcp://127.0.0.1:PORT), or pass --insecure-listen to accept the risk.")
