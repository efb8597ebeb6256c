import pytest

from minidora import ops


@pytest.fixture(params=["reference", "auto"])
def backend(request):
    """Run an NF4 test on the plain PyTorch reference and on the default dispatch (the compiled
    kernels when minidora._C is built). The choice holds for the test's thread only."""
    with ops.use(backend=request.param):
        yield request.param
