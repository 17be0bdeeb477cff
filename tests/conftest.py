import pytest
import torch


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to OpenMP spin-waiting when
    other processes share the cores (2 threads made such files 10x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
