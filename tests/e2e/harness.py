"""Process harness for the copilot-lb end-to-end suite.

Starts and stops, on 127.0.0.1 only:
  * the fake OpenAI-compatible model (fake_model.py),
  * N real headless Copilot CLI servers (`copilot --headless --host 127.0.0.1 --port P`),
  * the copilot-lb proxy binary (`copilot-lb serve --listen ... --backend ...`).

Every child runs in its own process group (start_new_session=True) and is registered in a
module-level registry; `stop_all()` runs from atexit and from the pytest fixtures'
finalizers, so no process is left behind even when a test fails or is interrupted.

Environment:
  COPILOT_LB_E2E_DIR     install dir made by install.sh (default <repo>/.e2e)
  COPILOT_LB_BIN         proxy binary (default <repo>/target/debug/copilot-lb)
  COPILOT_LB_E2E_DIRECT  "1": do not start the proxy; clients talk to backend 1 directly
  COPILOT_LB_E2E_KEEP    "1": keep the per-test temp dirs (pytest's tmp_path_factory decides anyway)
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
E2E_DIR = Path(os.environ.get("COPILOT_LB_E2E_DIR") or (REPO / ".e2e")).resolve()
COPILOT_BIN = Path(os.environ.get("COPILOT_BIN")
                   or (E2E_DIR / "npm" / "node_modules" / "@github" / "copilot-linux-x64" / "copilot"))
CACHE_DIR = E2E_DIR / "cache"
NPM_DIR = E2E_DIR / "npm"
LOOPBACK = "127.0.0.1"
MODEL_NAME = "fake-echo-1"


def direct_mode() -> bool:
    return os.environ.get("COPILOT_LB_E2E_DIRECT", "") not in ("", "0", "false", "no")


def proxy_bin() -> Path:
    return Path(os.environ.get("COPILOT_LB_BIN") or (REPO / "target" / "debug" / "copilot-lb"))


# ---------------------------------------------------------------------------------------
# ports
# ---------------------------------------------------------------------------------------
_PORT_LOCK = threading.Lock()
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never the same one twice in this process."""
    with _PORT_LOCK:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOOPBACK, 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise RuntimeError("could not find a free loopback port")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# managed processes
# ---------------------------------------------------------------------------------------
_REGISTRY_LOCK = threading.RLock()
_REGISTRY: list["Proc"] = []


def _die_with_parent() -> None:
    """preexec_fn: PR_SET_PDEATHSIG(SIGKILL), so a child dies even if pytest itself is SIGKILLed."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:  # noqa: BLE001  (non-Linux: rely on atexit / finalizers)
        pass


class Proc:
    """A child process in its own process group, output captured to a log file."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.pid = self.popen.pid
        with _REGISTRY_LOCK:
            _REGISTRY.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)  # pgid == pid (start_new_session)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                self.popen.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill9(self) -> None:
        """SIGKILL the whole process group right now (a crash, for failover tests)."""
        self.send_kill9()
        self.reap()

    def send_kill9(self) -> None:
        """Only send SIGKILL to the group; `reap()` later (to crash several processes at once)."""
        self._signal_group(signal.SIGKILL)

    def reap(self, timeout: float = 10.0) -> None:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL it after `timeout` s; always reaps the leader."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # SIGKILL the group unconditionally: children may outlive the leader.
        self._signal_group(signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            self._log.close()
        except OSError:
            pass
        with _REGISTRY_LOCK:
            if self in _REGISTRY:
                _REGISTRY.remove(self)

    def tail(self, lines: int = 60) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError as e:
            return f"<no log: {e}>"
        text = data.decode("utf-8", "replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_port(self, port: int, timeout: float) -> float:
        """Wait until 127.0.0.1:port accepts; returns seconds since start. Raises on exit/timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if port_open(port):
                return time.monotonic() - self.started_at
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode} before listening on "
                                   f"{LOOPBACK}:{port}; log {self.log_path}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not listening on {LOOPBACK}:{port} after {timeout:.0f} s; "
                                   f"log {self.log_path}:\n{self.tail()}")
            time.sleep(0.05)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} alive={self.alive()}>"


def stop_all() -> None:
    """Stop every process this module started (idempotent)."""
    with _REGISTRY_LOCK:
        procs = list(reversed(_REGISTRY))
    for p in procs:
        try:
            p.stop(timeout=3)
        except Exception as e:  # noqa: BLE001
            sys.stderr.write(f"harness: stopping {p.name} failed: {e}\n")


def running_procs() -> list[Proc]:
    with _REGISTRY_LOCK:
        return [p for p in _REGISTRY if p.alive()]


atexit.register(stop_all)


_TERM_COUNT = 0


def _term_to_interrupt(signum, frame):
    """SIGTERM/SIGHUP -> KeyboardInterrupt, so pytest runs its finalizers (and atexit runs
    stop_all). A second signal stops everything at once and exits."""
    global _TERM_COUNT
    _TERM_COUNT += 1
    if _TERM_COUNT > 1:
        stop_all()
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _term_to_interrupt)


# ---------------------------------------------------------------------------------------
# fake model
# ---------------------------------------------------------------------------------------
@dataclass
class FakeModel:
    port: int
    proc: Proc

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    def provider(self) -> dict:
        """The BYOK provider dict for the Python SDK (must be passed on create AND resume)."""
        return {"type": "openai", "base_url": self.base_url, "api_key": "fake-key", "wire_api": "completions"}

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}{path}", timeout=10) as r:
            return json.load(r)

    def requests(self) -> list[dict]:
        """Everything the model received so far (GET /__fake/requests)."""
        return self._get("/__fake/requests")

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests() if r["method"] == "POST" and r["path"].endswith("/chat/completions")]

    def reset(self) -> None:
        """Forget the recorded requests (POST /__fake/reset)."""
        req = urllib.request.Request(f"http://{LOOPBACK}:{self.port}/__fake/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def stop(self) -> None:
        self.proc.stop()


def start_fake_model(run_dir: Path, port: int | None = None, delay_ms: int = 0) -> FakeModel:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [sys.executable, str(HERE / "fake_model.py"), "--host", LOOPBACK, "--port", str(port),
            "--log", str(run_dir / "fake_model.requests.jsonl")]
    if delay_ms:
        argv += ["--delay-ms", str(delay_ms)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    proc = Proc("fake_model", argv, env=env, cwd=run_dir, log_path=run_dir / "fake_model.log")
    try:
        proc.wait_port(port, 15)
    except Exception:
        proc.stop()
        raise
    return FakeModel(port=port, proc=proc)


# ---------------------------------------------------------------------------------------
# Copilot CLI backends
# ---------------------------------------------------------------------------------------
@dataclass
class Backend:
    index: int
    port: int
    home: Path          # HOME of the process
    state_dir: Path     # COPILOT_HOME (config.json, logs/, session-state/, session-store.db)
    proc: Proc
    start_s: float = 0.0

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:  # what RuntimeConnection.for_uri() / forUri() take
        return self.addr

    def session_dirs(self) -> list[str]:
        d = self.state_dir / "session-state"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    def alive(self) -> bool:
        return self.proc.alive()

    def cli_log_tail(self, lines: int = 20) -> str:
        """Tail of the newest file in the CLI's own --log-dir (more detail than its stdout)."""
        logs = sorted((self.state_dir / "logs").glob("*"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return "<no CLI log file>"
        text = logs[-1].read_text("utf-8", "replace").splitlines()
        return f"({logs[-1]})\n" + "\n".join(text[-lines:])

    def kill9(self) -> None:
        self.proc.kill9()

    def stop(self) -> None:
        self.proc.stop()


def backend_env(home: Path, state_dir: Path, token: str | None = None, extra: dict | None = None) -> dict:
    """Scrubbed environment (like `env -i`) for one CLI server: no GitHub token can leak in."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "COPILOT_HOME": str(state_dir),
        "COPILOT_CACHE_HOME": str(CACHE_DIR),
        "COPILOT_AUTO_UPDATE": "false",
        "NO_COLOR": "1",
    }
    if token:
        env["COPILOT_CONNECTION_TOKEN"] = token
    if extra:
        env.update(extra)
    return env


def start_backends(n: int, run_dir: Path, *, shared_state: bool = False, token: str | None = None,
                   log_level: str = "info", timeout: float = 60.0,
                   extra_args: list[str] | None = None, first_index: int = 0) -> list[Backend]:
    """Start n CLI servers (in parallel) and wait until each listens.

    shared_state=False: every backend has its own COPILOT_HOME (shares nothing).
    shared_state=True : each backend still has its own COPILOT_HOME, but its `session-state`
                        is a symlink to one common <run_dir>/shared-session-state dir (so any
                        backend can resume any session; session-store.db stays per backend).
    """
    if not COPILOT_BIN.exists():
        raise RuntimeError(f"copilot CLI not found at {COPILOT_BIN}; run tests/e2e/install.sh")
    run_dir = Path(run_dir)
    shared = run_dir / "shared-session-state"
    if shared_state:
        shared.mkdir(parents=True, exist_ok=True)
    backends: list[Backend] = []
    try:
        for i in range(first_index, first_index + n):
            port = free_port()
            bdir = run_dir / f"backend{i + 1}"
            home, state, work = bdir / "home", bdir / "copilot-home", bdir / "work"
            for d in (home, state, work):
                d.mkdir(parents=True, exist_ok=True)
            if shared_state:
                link = state / "session-state"
                if link.exists() and not link.is_symlink():
                    raise RuntimeError(f"{link} exists and is not a symlink")
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(shared, target_is_directory=True)
            argv = [str(COPILOT_BIN), "--headless", "--host", LOOPBACK, "--port", str(port),
                    "--no-auto-update", "--log-level", log_level, "--log-dir", str(state / "logs")]
            argv += list(extra_args or [])
            proc = Proc(f"backend{i + 1}", argv, env=backend_env(home, state, token), cwd=work,
                        log_path=bdir / "cli.log")
            backends.append(Backend(index=i, port=port, home=home, state_dir=state, proc=proc))
        for b in backends:
            b.start_s = b.proc.wait_port(b.port, timeout)
        return backends
    except Exception:
        for b in backends:
            b.stop()
        raise


def restart_backend(b: Backend, run_dir: Path, *, token: str | None = None, log_level: str = "info",
                    timeout: float = 60.0, wait: bool = True) -> Backend:
    """Start a (killed) backend again on the same port, HOME and COPILOT_HOME.
    wait=False: return at once; the caller waits with `nb.proc.wait_port(nb.port, ...)`."""
    if b.alive():
        b.stop()
    argv = [str(COPILOT_BIN), "--headless", "--host", LOOPBACK, "--port", str(b.port),
            "--no-auto-update", "--log-level", log_level, "--log-dir", str(b.state_dir / "logs")]
    proc = Proc(f"backend{b.index + 1}", argv, env=backend_env(b.home, b.state_dir, token),
                cwd=b.home.parent / "work", log_path=b.home.parent / "cli.log")
    nb = Backend(index=b.index, port=b.port, home=b.home, state_dir=b.state_dir, proc=proc)
    if wait:
        nb.start_s = proc.wait_port(b.port, timeout)
    return nb


# ---------------------------------------------------------------------------------------
# the copilot-lb proxy
# ---------------------------------------------------------------------------------------
@dataclass
class Proxy:
    port: int
    admin_port: int | None
    proc: Proc
    argv: list[str] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return self.addr

    @property
    def admin_url(self) -> str | None:
        return f"http://{LOOPBACK}:{self.admin_port}" if self.admin_port else None

    def tail(self, lines: int = 80) -> str:
        return self.proc.tail(lines)

    def stop(self) -> None:
        self.proc.stop()


def start_proxy(backends: list[Backend], run_dir: Path, *, admin: bool = True, port: int | None = None,
                extra_args: list[str] | None = None, env_extra: dict | None = None,
                timeout: float = 30.0) -> Proxy:
    """Start `copilot-lb serve --listen 127.0.0.1:P --backend ... [--admin 127.0.0.1:A]`."""
    binary = proxy_bin()
    if not binary.exists():
        raise RuntimeError(f"copilot-lb binary not found at {binary} (build it with `cargo build`, "
                           f"set COPILOT_LB_BIN, or run with COPILOT_LB_E2E_DIRECT=1)")
    run_dir = Path(run_dir)
    port = port or free_port()
    admin_port = free_port() if admin else None
    argv = [str(binary), "serve", "--listen", f"{LOOPBACK}:{port}"]
    for b in backends:
        argv += ["--backend", b.addr]
    if admin_port:
        argv += ["--admin", f"{LOOPBACK}:{admin_port}"]
    argv += list(extra_args or [])
    if "--state-path" not in argv and "--config" not in argv:
        # Each proxy its own registry file: an embedded store is opened by one process only.
        argv += ["--state-path", str(run_dir / f"copilot-lb-state-{port}.redb")]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "HOME": str(run_dir), "RUST_BACKTRACE": "1",
           "RUST_LOG": os.environ.get("COPILOT_LB_E2E_RUST_LOG", os.environ.get("RUST_LOG", "info"))}
    if env_extra:
        env.update(env_extra)
    proc = Proc("copilot-lb", argv, env=env, cwd=run_dir, log_path=run_dir / "copilot-lb.log")
    try:
        proc.wait_port(port, timeout)
    except Exception:
        proc.stop()
        raise
    return Proxy(port=port, admin_port=admin_port, proc=proc, argv=argv)


# ---------------------------------------------------------------------------------------
# a whole cluster: fake model + N backends + proxy (or direct)
# ---------------------------------------------------------------------------------------
@dataclass
class Cluster:
    run_dir: Path
    model: FakeModel
    backends: list[Backend]
    proxy: Proxy | None
    direct: bool

    @property
    def client_url(self) -> str:
        """Where SDK clients connect: the proxy, or backend 1 in direct mode."""
        return self.backends[0].url if self.direct else self.proxy.url

    def provider(self) -> dict:
        return self.model.provider()

    def kill_backend(self, index: int) -> None:
        """`kill -9` backend `index` (0-based) and its process group: a crash, for failover tests."""
        self.backends[index].kill9()

    def kill_backends(self, indices: list[int]) -> tuple[float, float]:
        """`kill -9` several backends back to back (every signal first, reaping after): a
        correlated crash. Returns time.perf_counter() before the first and after the last signal."""
        procs = [self.backends[i].proc for i in indices]
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1.0)  # keep the GIL: no SDK reader thread runs between the signals
        try:
            first = time.perf_counter()
            for p in procs:
                p.send_kill9()
            last = time.perf_counter()
        finally:
            sys.setswitchinterval(switch)
        for p in procs:
            p.reap()
        return first, last

    def restart_backend(self, index: int) -> Backend:
        """Start backend `index` again (same port, HOME and COPILOT_HOME)."""
        self.backends[index] = restart_backend(self.backends[index], self.run_dir)
        return self.backends[index]

    def restart_dead_backends(self, timeout: float = 60.0) -> list[int]:
        """Start every dead backend again; they boot in parallel. (Spawned from this thread:
        PR_SET_PDEATHSIG fires when the spawning *thread* exits, so no helper threads.)"""
        dead = [i for i, b in enumerate(self.backends) if not b.alive()]
        for i in dead:
            self.backends[i] = restart_backend(self.backends[i], self.run_dir, wait=False)
        for i in dead:
            b = self.backends[i]
            b.start_s = b.proc.wait_port(b.port, timeout)
        return dead

    def admin(self, path: str, method: str = "GET") -> dict:
        """GET/POST the proxy's admin API, JSON answer."""
        req = urllib.request.Request(self.proxy.admin_url + path, method=method,
                                     data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def placements(self) -> dict[str, str]:
        """session id -> backend address, as the proxy's admin API reports them."""
        return {s["session_id"]: s["backend"] for s in self.admin("/api/sessions?limit=100000")["sessions"]}

    def wait_backends_up(self, addrs: list[str], timeout: float = 30.0) -> None:
        """Until the proxy's health checks report every one of `addrs` as up."""
        deadline = time.monotonic() + timeout
        while True:
            backends = self.admin("/api/backends")["backends"]
            states = {b["name"]: b["state"] for b in backends}
            if all(states.get(a) == "up" for a in addrs):
                return
            if time.monotonic() > deadline:
                checks = {b["name"]: b.get("health_history", [])[:3] for b in backends if b["state"] != "up"}
                raise RuntimeError(f"backends not up after {timeout:.0f} s: {states}; latest checks {checks}")
            time.sleep(0.1)

    def log_tails(self, lines: int = 40) -> str:
        out = []
        if self.proxy is not None:
            out.append(f"==== copilot-lb ({self.proxy.proc.log_path}) ====\n{self.proxy.tail(lines * 2)}")
        for b in self.backends:
            out.append(f"==== backend{b.index + 1} {b.addr} alive={b.alive()} ({b.proc.log_path}) ====\n"
                       f"{b.proc.tail(lines)}\n-- CLI log-dir tail {b.cli_log_tail(lines // 2)}")
        return "\n".join(out)

    def stop(self) -> None:
        for thing in ([self.proxy] if self.proxy else []) + list(reversed(self.backends)) + [self.model]:
            try:
                thing.stop()
            except Exception as e:  # noqa: BLE001
                sys.stderr.write(f"harness: stop failed: {e}\n")


def start_cluster(run_dir: Path, *, n_backends: int = 3, shared_state: bool = False,
                  token: str | None = None, direct: bool | None = None, admin: bool = True,
                  proxy_args: list[str] | None = None) -> Cluster:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    direct = direct_mode() if direct is None else direct
    model = start_fake_model(run_dir)
    backends: list[Backend] = []
    try:
        backends = start_backends(n_backends, run_dir, shared_state=shared_state, token=token)
        proxy = None if direct else start_proxy(backends, run_dir, admin=admin, extra_args=proxy_args)
    except Exception:
        for b in backends:
            b.stop()
        model.stop()
        raise
    return Cluster(run_dir=run_dir, model=model, backends=backends, proxy=proxy, direct=direct)


def cleanup_dir(path: Path) -> None:
    if os.environ.get("COPILOT_LB_E2E_KEEP") == "1":
        return
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# a real redis-server (the session registry of a fleet of copilot-lb replicas)
# ---------------------------------------------------------------------------------------
REDIS_SERVER = os.environ.get("REDIS_SERVER", "redis-server")


def _resp_encode(args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _resp_read(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2].decode("utf-8", "replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_read(f) for _ in range(n)]
    raise RuntimeError(f"unexpected redis reply {line!r}")


@dataclass
class Redis:
    """One `redis-server` on a loopback port, no persistence (a restart comes back empty)."""
    port: int
    run_dir: Path
    proc: Proc

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def command(self, *args, timeout: float = 5.0):
        """One command on a fresh connection (RESP); the decoded reply."""
        with socket.create_connection((LOOPBACK, self.port), timeout=timeout) as s:
            s.sendall(_resp_encode(args))
            with s.makefile("rb") as f:
                return _resp_read(f)

    def keys(self, pattern: str = "*") -> list[str]:
        return sorted(self.command("KEYS", pattern))

    def hgetall(self, key: str) -> dict[str, str]:
        flat = self.command("HGETALL", key) or []
        return dict(zip(flat[::2], flat[1::2]))

    def ping(self) -> bool:
        try:
            return self.command("PING", timeout=0.5) == "PONG"
        except (OSError, RuntimeError, ConnectionError):
            return False

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a stalled Redis)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart_empty(self, timeout: float = 10.0) -> None:
        """kill -9 and start again on the same port with nothing in it."""
        self.stop()
        self.proc = _spawn_redis(self.port, self.run_dir, timeout)

    def stop(self) -> None:
        if self.proc.alive():
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
            except ProcessLookupError:
                pass
        self.proc.kill9()
        self.proc.stop(timeout=1)


def _spawn_redis(port: int, run_dir: Path, timeout: float) -> Proc:
    data = Path(run_dir) / "redis-data"
    data.mkdir(parents=True, exist_ok=True)
    argv = [REDIS_SERVER, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
            "--protected-mode", "yes", "--dir", str(data)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    try:
        proc = Proc(f"redis-{port}", argv, env=env, cwd=Path(run_dir), log_path=Path(run_dir) / f"redis-{port}.log")
    except FileNotFoundError as e:
        raise RuntimeError(f"{REDIS_SERVER} not installed (scripts/install-test-deps.sh installs it): {e}") from e
    probe = Redis(port=port, run_dir=Path(run_dir), proc=proc)
    deadline = time.monotonic() + timeout
    while not probe.ping():
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"redis-server on port {port} not answering PING; log:\n{proc.tail()}")
        time.sleep(0.02)
    return proc


def start_redis(run_dir: Path, port: int | None = None, timeout: float = 10.0) -> Redis:
    """Start `redis-server` on a free loopback port with its own temp dir; stop() at teardown."""
    port = port or free_port()
    return Redis(port=port, run_dir=Path(run_dir), proc=_spawn_redis(port, run_dir, timeout))


def hash_token(tok: str) -> str:
    """A tenant's token_hashes entry for `tok`, as `copilot-lb hash-token` prints it (stdin, so
    the token never lands in an argv)."""
    out = subprocess.run([str(proxy_bin()), "hash-token"], input=tok + "\n", capture_output=True,
                         text=True, check=True, timeout=10)
    return out.stdout.strip()
