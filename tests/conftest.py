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


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile every kernel variant once, into Numba's on-disk cache, before any test starts a peer.

    Each attention peer compiles (or loads from that cache) the same variants before it announces
    itself; on a cold cache that takes minutes on two cores, and every peer started would pay it.
    """
    from lamina_p2p.attention.peer import AttentionPeer, AttentionPeerConfig

    AttentionPeer(AttentionPeerConfig(kv_bytes=1 << 24))._warm()
