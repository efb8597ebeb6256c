import pytest

from minidora import ops


@pytest.fixture(params=["reference", "auto"])
def backend(request):
    """Run an NF4 test on the plain PyTorch reference and on the default dispatch (the compiled
    kernels when minidora._C is built)."""
    previous = ops.get_backend()
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(previous)
