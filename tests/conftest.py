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
