"""Default locations (fptq.paths)."""
from __future__ import annotations

from pathlib import Path

from fptq import paths


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("FPTQ_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "fptq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert paths.cache_dir() == Path("~/.cache/fptq").expanduser()
    monkeypatch.setenv("FPTQ_CACHE", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"
    assert paths.models_cache_dir() == tmp_path / "c" / "models"
    assert paths.kernels_cache_dir() == tmp_path / "c" / "kernels"
    assert paths.generated_data_dir() == tmp_path / "c" / "generated"


def test_old_home_still_exports_cache_dir():
    from fptq.models.loading import cache_dir

    assert cache_dir is paths.cache_dir
