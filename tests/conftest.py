"""The tests' shared layer: environment for two shared cores, kernels compiled once, and fixtures.

- `tiny` / `tiny_preset(seed, dtype)`: the tiny preset checkpoint, written once per session.
- `attention_peers(count, *args, **opts)`, `launch_peer(args)`: real peer processes on loopback
  (real ZeroMQ), stopped when the test ends; `serve_url(model, *options)`: a running
  `lamina-node serve`, stopped when the module ends. pyzmq's tests/conftest.py hands out
  sockets the same way: its `socket` factory fixture records each socket in `sockets`, which
  closes them all at teardown (here: `peer_group`, a helpers.PeerGroup).
Helpers that test modules import (HTTP clients, /metrics, shared workloads) are in helpers.py.
"""

import os

# The CUDA kernels are tested on the simulator unless a run asks for the real
# device (tools/gpu_check.sh sets NUMBA_ENABLE_CUDASIM=0). Must happen before
# anything imports numba.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# Peers and tests share two cores: keep every library to one thread unless a
# test says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")
# As the CLI does for every peer: spinning OpenMP workers starve the other threads and processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402
from helpers import PeerGroup  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile every kernel variant once, into Numba's on-disk cache, before any test starts a peer.

    Each attention peer compiles (or loads from that cache) the same variants before it announces
    itself; on a cold cache that takes minutes on two cores, and every peer started would pay it.
    """
    from lamina_p2p.attention.peer import AttentionPeer, AttentionPeerConfig

    AttentionPeer(AttentionPeerConfig(kv_bytes=1 << 24))._warm()


# -- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory):
    """Factory: tiny_preset(seed=0, dtype="float32") -> the directory (Path) of the `tiny` preset
    checkpoint written with those parameters, once per session. Shared: a test that changes the
    files copies the directory first."""
    from lamina_p2p.model.presets import write_preset

    written = {}

    def make(seed: int = 0, dtype: str = "float32"):
        if (seed, dtype) not in written:
            written[seed, dtype] = write_preset("tiny", tmp_path_factory.mktemp(f"tiny-{seed}-{dtype}") / "tiny",
                                                seed=seed, dtype=dtype)
        return written[seed, dtype]

    return make


@pytest.fixture(scope="session")
def tiny(tiny_preset):
    """The float32 `tiny` preset checkpoint (seed 0) every test that needs a small model uses (Path)."""
    return tiny_preset()


# -- peer processes (real processes, real ZeroMQ) ------------------------------------------------


@pytest.fixture
def peer_group():
    """The PeerGroup of this test: every peer started through it is stopped at teardown."""
    with PeerGroup() as group:
        yield group


@pytest.fixture(scope="module")
def module_peer_group():
    """The PeerGroup of this module, for module-scoped fixtures: stopped at the module's end."""
    with PeerGroup() as group:
        yield group


@pytest.fixture
def attention_peers(peer_group):
    """Factory: attention_peers(count, *args, join=None, **opts) -> [PeerProcess], each READY, the later
    ones joined to the first; all stopped at teardown (see helpers.PeerGroup.attention)."""
    return peer_group.attention


@pytest.fixture
def launch_peer(peer_group):
    """Factory: launch_peer(["start", "--role", ...]) -> the PeerProcess of `lamina-node <args>`,
    READY; stopped at teardown unless the test stopped or killed it first."""
    return peer_group.start


@pytest.fixture(scope="module")
def serve_url(module_peer_group):
    """Factory: serve_url(model, *options) -> the base URL (http://127.0.0.1:port) of a running
    `lamina-node serve --model <model> <options>`; stopped at the module's end."""
    return module_peer_group.serve
