import sys

import pytest

from fptq.memory import return_freed_memory_to_os


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_mmap_threshold_is_applied_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert return_freed_memory_to_os() is True
