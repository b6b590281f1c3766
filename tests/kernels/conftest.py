"""Kernel-test fixtures: the WKV CPU extension, built once per session (first build ~30-40 s on 2 cores)."""

import shutil

import pytest


@pytest.fixture(scope="session")
def wkv_cpu_ext():
    """The built CPU extension module. Skips without a C++ compiler; any other build failure fails."""
    from neox.ops.build import ExtensionBuildError
    from neox.ops.wkv import _load

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the WKV CPU extension cannot be built")
    try:
        return _load("cpu")
    except ExtensionBuildError as e:
        pytest.fail(f"the WKV CPU extension failed to build: {e}")
