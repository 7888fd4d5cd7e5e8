import sys

import pytest

from fptq.memory import return_freed_memory_to_os


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_mmap_threshold_is_applied_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert return_freed_memory_to_os() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_heap_runs_on_glibc():
    import platform

    from fptq.memory import trim_heap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert trim_heap() is True


def test_low_memory_flag_is_in_quantize_help():
    from fptq.cli import build_parser

    args = build_parser().parse_args(["quantize", "-o", "x", "--low-memory"])
    assert args.low_memory is True
    assert build_parser().parse_args(["quantize", "-o", "x"]).low_memory is False
