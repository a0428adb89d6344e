"""Static checks of the Dockerfile and .dockerignore (no container engine here), and a
wheel built from exactly the files the build context would contain."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from manifest_util import REPO, package_version

DOCKERFILE = REPO / "Dockerfile"
PINNED_BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm$")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, args = buf.partition(" ")
            out.append((word.upper(), args.strip()))
            buf = ""
    return out


def stages(instrs):
    result = []
    for word, args in instrs:
        if word == "FROM":
            result.append([])
        if result:  # an ARG before the first FROM (BASE) belongs to no stage
            result[-1].append((word, args))
    return result


INSTRS = instructions(DOCKERFILE.read_text())


def test_base_images_are_pinned_and_the_same():
    # One Dockerfile for both routes: FROM ${BASE}, BASE's default the pinned registry image
    # (scripts/build-images.sh passes its mmdebstrap base instead).
    args_before_from = dict(
        a.split("=", 1) for w, a in INSTRS[: [w for w, _ in INSTRS].index("FROM")] if w == "ARG" and "=" in a)
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args_before_from[m.group(1)], args.split()[0])
             for word, args in INSTRS if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for image in froms:
        assert PINNED_BASE.match(image), image
        assert not image.endswith(":latest")
    assert len(set(froms)) == 1  # the venv's interpreter path must exist in the final stage


def test_no_add_and_no_urls_in_copy():
    for word, args in INSTRS:
        assert word != "ADD", "use COPY; ADD fetches URLs and unpacks archives"
        if word == "COPY":
            assert "://" not in args


def test_apt_installs_are_minimal_and_cleaned():
    runs = [args for word, args in INSTRS if word == "RUN" and "apt-get install" in args]
    assert runs
    for args in runs:
        assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args


def test_final_stage_has_the_tools_and_no_compiler():
    final = stages(INSTRS)[-1]
    text = " ".join(args for _, args in final)
    for pkg in ("iptables", "ipset", "iproute2"):
        assert re.search(rf"\b{pkg}\b", text), pkg
    for pkg in ("gcc", "build-essential", "libc6-dev", "pip install"):
        assert pkg not in text
    assert any(word == "COPY" and args.startswith("--from=") for word, args in final)
    user = [args for word, args in final if word == "USER"]
    assert user == ["0:0"]  # root, documented: iptables needs it


def test_no_stage_installs_a_compiler():
    """python-iptables (the only dependency with a C extension) is a bench extra, not a
    runtime requirement: the image builds from wheels alone."""
    text = " ".join(args for word, args in INSTRS if word == "RUN")
    for pkg in ("gcc", "build-essential", "libc6-dev", "python3-dev"):
        assert not re.search(rf"\b{re.escape(pkg)}\b", text), pkg


def test_runtime_requirements_have_no_bench_only_library():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    runtime = cfg["options"]["install_requires"]
    assert "python-iptables" not in runtime and "matplotlib" not in runtime
    bench = cfg["options.extras_require"]["bench"]
    assert "python-iptables" in bench and "matplotlib" in bench


def test_label_version_is_the_package_version():
    labels = " ".join(args for word, args in INSTRS if word == "LABEL")
    assert f'org.opencontainers.image.version="{package_version()}"' in labels


def ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for our simple patterns: last match wins, ! re-includes."""
    result = False
    parts = rel.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        hit = False
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, p) or (p.startswith("**/") and fnmatch.fnmatch(parts[i - 1], p[3:])):
                hit = True
        if hit:
            result = not neg
    return result


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def context_files() -> list[str]:
    pats = dockerignore()
    out = []
    for p in REPO.rglob("*"):
        rel = p.relative_to(REPO).as_posix()
        if p.is_file() and not rel.startswith((".git/", ".venv/")) and not ignored(rel, pats):
            out.append(rel)
    return sorted(out)


def test_dockerignore_keeps_out_everything_but_the_sources():
    files = context_files()
    assert "setup.cfg" in files and "README.md" in files and "cni_shim/install.py" in files
    for rel in files:
        assert rel in ("pyproject.toml", "setup.cfg", "README.md") or rel.startswith(("policy_agent/", "cni_shim/")), rel
        assert "__pycache__" not in rel and not rel.endswith(".pyc")


def test_every_copy_source_is_in_the_context():
    files = context_files()
    for word, args in INSTRS:
        if word != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert any(f == src or f.startswith(src.rstrip("/") + "/") for f in files), src


@pytest.mark.slow
def test_the_context_builds_a_wheel(tmp_path):
    """pip builds the project from exactly the files the Dockerfile's context holds
    (e.g. README.md, which setup.cfg reads, must not be ignored)."""
    ctx = tmp_path / "ctx"
    for rel in context_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ctx)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheel = next(Path(out).glob("*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "cni_shim/install.py" in names and "policy_agent/shared/endpoint.py" in names
    assert not any(n.startswith("tests/") for n in names)
