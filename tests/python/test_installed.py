"""The package as users install it: an sdist built from this checkout, a wheel built from that
sdist, installed into a new virtual environment and run from a directory outside the tree.

No ``PYTHONPATH``, no editable finder, no checkout on ``sys.path``: what works only from the
source tree fails here. kvpool and its declared dependencies come from the wheel alone; vLLM is
the user's own install, so for the engine test the new environment also sees the development
environment's packages through a ``.pth`` path entry placed after its own site-packages (the
editable install's finder there is not activated by a path entry, and the wheel's ``kvpool``,
a regular package earlier on ``sys.path``, wins over the development copy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RedisProcess, cluster_name, wait_until

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 900
ENGINE_TIMEOUT_S = 600


@dataclass
class Installed:
    """A new virtual environment holding the built wheel, and a working directory outside the
    source tree to run it from."""

    venv: Path
    cwd: Path
    wheel: Path

    def exe(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The caller's environment without PYTHONPATH, KVPOOL_* settings or the development
        environment on PATH; the new environment's bin first."""
        dev_bin = str(Path(sys.executable).parent)
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != dev_bin]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KVPOOL_", "PYTHON", "VIRTUAL_ENV"))
        }
        env.update(PATH=os.pathsep.join([str(self.venv / "bin"), *path]), PYTHONUNBUFFERED="1")
        env.update(extra or {})
        return env

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run_group(argv, cwd=self.cwd, env=self.env(env), timeout=timeout)

    def python(self, code: str, *args: str, timeout: float = 120.0) -> str:
        out = self.run([self.exe("python"), "-c", code, *args], timeout=timeout)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def start_node(self, redis_url: str, cluster: str, log: Path) -> subprocess.Popen[bytes]:
        """A ``kvpool server`` of the installed package; its output goes to ``log`` (a file, so
        a chatty node can never block on a full pipe)."""
        with open(log, "wb") as out:
            return subprocess.Popen(
                [self.exe("kvpool"), "server", "--port", "0", "--memory", "32MiB",
                 "--redis", redis_url, "--cluster", cluster, "--lease-ttl", "5"],
                cwd=self.cwd, env=self.env(), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip


def run_group(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Runs ``argv`` to completion in a process group of its own; past ``timeout`` the whole
    group is killed (``kvpool local``'s redis-server and engines, a build's compilers) and the
    test fails with its output."""
    proc = subprocess.Popen(
        list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{argv} ran past {timeout} s:\n{stdout[-4000:]}{stderr[-4000:]}"
        ) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


def _check(argv: Sequence[str], cwd: Path, timeout: float = BUILD_TIMEOUT_S) -> None:
    out = run_group(argv, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(argv)} failed:\n{out.stdout[-4000:]}{out.stderr[-4000:]}"
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    work = tmp_path_factory.mktemp("installed")
    dist, wheels = work / "dist", work / "wheels"
    # The sdist through the build backend's own hook (what `python -m build --sdist` calls),
    # then a wheel built from that sdist alone: both must hold everything the package needs.
    _check(
        [sys.executable, "-c",
         "import sys; from scikit_build_core.build import build_sdist; build_sdist(sys.argv[1])",
         str(dist)],
        REPO,
    )  # fmt: skip
    (sdist,) = dist.glob("kvpool-*.tar.gz")
    _check(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
         "-w", str(wheels), str(sdist)],
        work,
    )  # fmt: skip
    (wheel,) = wheels.glob("kvpool-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    # The dependencies come from the wheel's metadata (pip resolves them from the index).
    _check([py, "-m", "pip", "install", "-q", str(wheel)], work)
    cwd = work / "elsewhere"
    cwd.mkdir()
    yield Installed(env_dir, cwd, wheel)


def test_the_wheel_carries_the_library_and_imports_from_its_own_environment(
    installed: Installed,
) -> None:
    out = installed.python(
        "import json, sys, kvpool, kvpool._core, kvpool.metadata as m\n"
        "print(json.dumps({'kvpool': kvpool.__file__, 'core': kvpool._core.__file__,"
        " 'path': sys.path, 'library': len(m.library_source())}))"
    )
    info = json.loads(out)
    site = str(installed.venv)
    assert info["kvpool"].startswith(site) and info["core"].startswith(site), info
    assert not any(p.startswith(str(REPO)) for p in info["path"] if p), info["path"]
    assert info["library"] > 1000
    # The declared dependencies were installed with it.
    installed.python("import redis, hiredis")


def test_installed_nodes_join_and_a_cluster_round_trips_exact_bytes(
    installed: Installed,
) -> None:
    redis_proc = RedisProcess()
    name = cluster_name("i")
    logs = [installed.cwd / f"node{i}.log" for i in range(3)]
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        for log in logs:
            nodes.append(installed.start_node(redis_proc.url, name, log))

        def members() -> int:
            out = installed.run(
                [installed.exe("kvpool"), "status", "--redis", redis_proc.url,
                 "--cluster", name, "--json"]
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            return len(json.loads(out.stdout)["nodes"])

        wait_until(lambda: members() == 3, timeout=30, interval=0.1, what="3 members")
        text = installed.run(
            [installed.exe("kvpool"), "status", "--redis", redis_proc.url, "--cluster", name]
        )
        assert text.returncode == 0 and "nodes 3" in text.stdout, text.stdout + text.stderr
        script = """
import os, sys, time
import kvpool
keys = [os.urandom(16) for _ in range(48)]
blocks = [os.urandom(4096 + i) for i in range(48)]
with kvpool.Cluster(sys.argv[1], sys.argv[2], timeout=5.0) as c:
    assert len(c.members()) == 3, c.members()
    assert c.put(keys, blocks) == 48
    deadline = time.monotonic() + 10
    while c.match_prefix(keys) != 48:
        assert time.monotonic() < deadline, c.match_prefix(keys)
        time.sleep(0.02)
    assert c.get(keys) == blocks
    assert len({m.node_id for m in c.members()}) == 3
print("round trip ok")
"""
        assert "round trip ok" in installed.python(script, redis_proc.url, name)
    finally:
        for p in nodes:
            p.terminate()
        for p in nodes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        redis_proc.cleanup()
    assert all(p.returncode == 0 for p in nodes), [log.read_text() for log in logs]


@pytest.mark.parametrize(
    ("piece", "named"),
    [
        ("kvpool/redis_scripts", "the Redis Functions library (redis_scripts/*.lua) is missing"),
        ("kvpool/_core.*.so", "the C++ extension kvpool._core does not load"),
        ("redis", "the Python package 'redis' is missing"),
    ],
)
def test_a_broken_install_is_one_line_naming_the_missing_piece(
    installed: Installed, piece: str, named: str
) -> None:
    """A piece of the installed package removed: a node and ``kvpool status`` (on a Redis that
    never had the library) say which, in one line, instead of a traceback or a node that never
    joins."""
    site = Path(sysconfig.get_path("purelib", vars={"base": str(installed.venv)}))
    (path,) = site.glob(piece)
    hidden = path.with_name(path.name + ".hidden")
    redis_proc = RedisProcess()
    try:
        path.rename(hidden)
        kvpool = installed.exe("kvpool")
        out = installed.run(
            [kvpool, "server", "--port", "0", "--redis", redis_proc.url, "--cluster", "x"]
        )
        status = installed.run([kvpool, "status", "--redis", redis_proc.url, "--cluster", "x"])
    finally:
        if hidden.exists():
            hidden.rename(path)
        redis_proc.cleanup()
    for o in (out, status):
        assert o.returncode == 2, o.stdout + o.stderr
        lines = o.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in o.stderr, o.stderr
        assert lines[0].startswith(f"kvpool: error: {named}"), lines


def test_main_job_without_vllm_names_it_in_one_line(installed: Installed) -> None:
    """vLLM is the user's own install: without it, ``kvpool local`` says so before it starts
    anything, and points at the demo that needs no vLLM."""
    out = installed.run([installed.exe("kvpool"), "local", "--tokens", "64"])
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == "" and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("kvpool: error: vLLM is not installed"), out.stderr
    assert "--engines synthetic" in out.stderr


@pytest.mark.vllm
def test_installed_main_job_two_engines_share_the_prefix(installed: Installed) -> None:
    """``kvpool local`` (the README's first command) from the installed package: its own cluster,
    engine A then a fresh engine B, which loads the whole shared prefix from kvpool."""
    dev_site = sysconfig.get_path("purelib")
    site = Path(sysconfig.get_path("purelib", vars={"base": str(installed.venv)}))
    (site / "zz_user_vllm.pth").write_text(dev_site + "\n")  # vLLM: the user's own install
    try:
        where = installed.python(
            "import kvpool, vllm; print(kvpool.__file__); print(vllm.__file__)"
        ).split()
        assert where[0].startswith(str(installed.venv)), where
        out = installed.run(
            [installed.exe("kvpool"), "local", "--tokens", "1024", "--memory", "64MiB"],
            env={"XDG_CACHE_HOME": str(installed.cwd / "cache")},  # the tiny model goes here
            timeout=ENGINE_TIMEOUT_S,
        )
    finally:
        (site / "zz_user_vllm.pth").unlink()
    assert out.returncode == 0, out.stdout + out.stderr[-6000:]
    assert "engine A: TTFT" in out.stdout and "stored 33 blocks" in out.stdout, out.stdout
    assert "engine B: loaded 1024 of 1072 prompt tokens from kvpool" in out.stdout, out.stdout
    assert "faster" in out.stdout
