"""Process-wide settings for the test suite (inherited by every spawned or torchrun-launched process).

Collectives run over loopback only: the machine's host name may not resolve (fresh CI machines), so gloo is told
to use the loopback interface and rendezvous addresses are 127.0.0.1. One intra-op thread per process: tests run
several processes on two cores, and oversubscription only slows them down (results do not depend on it).
"""

import os

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
