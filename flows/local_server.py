"""One local Prefect server per fulltune home, started on first use and shared by every run.

Without ``PREFECT_API_URL``, Prefect starts a temporary server inside each flow run, all of them on
one shared SQLite file: runs started together time out waiting for their server or fail with
``database is locked``. Here the first run on a home starts ``prefect server start`` as its own
long-lived process (its database under ``<home>/prefect``, so only that process writes it), under a
file lock so two runs never start two servers, and every later run, ``fulltune serve`` and
``fulltune ui`` connect to it. Its flow runs stay visible in its UI after the runs end.

``fulltune server stop`` stops it; ``PREFECT_API_URL`` (or a Prefect profile's API URL) points
fulltune at another server instead. A server a run started stops itself once no fulltune command
has used it for ``FULLTUNE_SERVER_IDLE`` (30m; ``0`` keeps it): every run touches
``<home>/prefect/last_used`` while it lives, and a small reaper process watches that file.
``fulltune server start`` starts one that stays; ``fulltune server list`` lists every running one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock
from pydantic import BaseModel

from tasks.environment import restored_environment

# How long to wait for a starting server before giving up: a bound on a hung start, generous
# because a busy 2-core machine needs a minute or more where an idle one needs 15 s.
START_ATTEMPTS = 3  # a server that exits while starting (its port taken) is started again
START_TIMEOUT_S = float(os.environ.get("FULLTUNE_SERVER_START_TIMEOUT", "600"))


PREFECT_SERVER = (sys.executable, "-m", "prefect", "server", "start")


def idle_limit_s() -> float:
    """How long a run-started server may sit unused before it stops itself (0: never)."""
    from tasks.config import parse_duration

    value = os.environ.get("FULLTUNE_SERVER_IDLE", "30m").strip()
    return 0.0 if value in ("0", "", "never") else parse_duration(value)


def servers_index() -> Path:
    """Where every running server of this user is listed (``fulltune server list``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fulltune" / "servers"


def touch(home: Path) -> None:
    """Mark the home's server as used now (the reaper's idle clock)."""
    with suppress(OSError):
        (server_dir(home) / "last_used").touch()


class ServerError(RuntimeError):
    """The local Prefect server could not be started or reached."""


class ServerInfo(BaseModel):
    """What ``<home>/prefect/server.json`` records about the running server."""

    pid: int
    port: int
    started_at: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_dir(home: Path) -> Path:
    return home / "prefect"


def configured_api_url() -> str | None:
    """The Prefect API the user chose (environment or profile), if any."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet collected, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def listens(info: ServerInfo) -> bool:
    """Whether the server's own process listens on its port. Another process may answer there:
    a port picked free can be taken before the server binds it (then the server exits), and a
    healthy answer from someone else's server must not count as this home's."""
    import psutil

    try:
        connections = psutil.Process(info.pid).net_connections("inet")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == info.port for c in connections)


def answers(info: ServerInfo) -> bool:
    """Whether this home's server is up: its process listens on its port, and the API is healthy."""
    return listens(info) and healthy(info.url)


def read_info(home: Path) -> ServerInfo | None:
    path = server_dir(home) / "server.json"
    try:
        return ServerInfo.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_environment(folder: Path, port: int) -> dict[str, str]:
    """The server process's settings: its own Prefect home and database, its UI's API URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {
        "PREFECT_HOME": str(folder),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def wait_until_healthy(info: ServerInfo, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not answers(info):
        if not alive(info.pid):
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise ServerError(f"the Prefect server exited while starting; {log_path}:\n{tail}")
        if time.monotonic() > deadline:
            raise ServerError(
                f"the Prefect server (pid {info.pid}) did not answer on {info.url} within "
                f"{timeout:.0f} s (FULLTUNE_SERVER_START_TIMEOUT); its log: {log_path}"
            )
        time.sleep(0.5)


def ensure_server(
    home: Path, timeout: float = START_TIMEOUT_S, wait: bool = True, stays: bool = False
) -> ServerInfo:
    """The home's running Prefect server; started (under a file lock) if none answers.

    With ``wait=False`` a server is started if none runs, but not waited for: a run imports its
    libraries while the server boots (both take seconds) and waits for it afterwards. A server
    started here stops itself after :func:`idle_limit_s` unused, unless ``stays``.
    """
    folder = server_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    touch(home)
    info = read_info(home)
    if info is not None and alive(info.pid) and answers(info):
        return info  # the common case: no lock needed
    with FileLock(folder / "server.lock"):  # one starter per home; the others wait, reuse it
        info = read_info(home)
        if info is not None and alive(info.pid):
            # Running but slow to answer (a busy machine, or still starting): wait for it
            # rather than start a second server on the same database.
            if wait:
                wait_until_healthy(info, folder / "server.log", timeout)
            return info
        log_path = folder / "server.log"
        for attempt in range(START_ATTEMPTS):
            info = _start(home, folder, log_path, stays)
            if not wait:
                return info
            try:
                wait_until_healthy(info, log_path, timeout)
            except ServerError:
                if alive(info.pid) or attempt + 1 == START_ATTEMPTS:
                    raise
                continue  # it exited while starting (its port was taken meanwhile): another port
            touch(home)  # the idle clock starts once the server answers, not while it boots
            return info
    raise AssertionError("unreachable")


def _start(home: Path, folder: Path, log_path: Path, stays: bool) -> ServerInfo:
    """Start the home's server on a free port; record it (and, unless ``stays``, its reaper)."""
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*PREFECT_SERVER, "--host", "127.0.0.1", "--port", str(port)],
            env=server_environment(folder, port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this run; stopped as a group
        )
    info = ServerInfo(pid=process.pid, port=port, started_at=time.time())
    (folder / "server.json").write_text(info.model_dump_json())
    index = servers_index()
    with suppress(OSError):
        index.mkdir(parents=True, exist_ok=True)
        entry = {"home": str(home.resolve()), **info.model_dump()}
        (index / f"{info.pid}.json").write_text(json.dumps(entry))
    idle = idle_limit_s()
    if idle > 0 and not stays:
        subprocess.Popen(
            [sys.executable, "-m", "flows.local_server", "reap", str(home), str(info.pid)],
            env=os.environ | {"FULLTUNE_SERVER_IDLE": f"{idle}s"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    return info


def stop_server(home: Path, timeout: float = 30.0) -> ServerInfo | None:
    """Stop the home's server (its whole process group); the one stopped, or None."""
    folder = server_dir(home)
    info = read_info(home)
    if info is None:
        return None
    with FileLock(folder / "server.lock"):
        if alive(info.pid):
            with suppress(ProcessLookupError):
                os.killpg(info.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while alive(info.pid) and time.monotonic() < deadline:
                _reap(info.pid)
                time.sleep(0.2)
            if alive(info.pid):
                os.killpg(info.pid, signal.SIGKILL)
                _reap(info.pid)
        (folder / "server.json").unlink(missing_ok=True)
    return info


def reap(home: Path, pid: int) -> None:
    """Stop the home's server ``pid`` once it has been unused for :func:`idle_limit_s`."""
    idle = idle_limit_s()
    step = max(0.5, min(30.0, idle / 4))
    marker = server_dir(home) / "last_used"
    while alive(pid):
        time.sleep(step)
        info = read_info(home)
        if info is None or info.pid != pid:
            return  # stopped, or replaced by another server: not this reaper's
        last = max(marker.stat().st_mtime if marker.exists() else 0.0, info.started_at)
        if time.time() - last > idle and healthy(info.url):  # still booting is not unused
            with (server_dir(home) / "server.log").open("a") as log:
                log.write(f"fulltune: stopping the server after {idle:.0f} s unused\n")
            stop_server(home)
            return


def running_servers() -> list[dict[str, object]]:
    """Every fulltune Prefect server of this user that still runs (stale entries removed)."""
    found = []
    index = servers_index()
    for entry in sorted(index.glob("*.json")) if index.is_dir() else []:
        try:
            server = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        if not alive(int(server["pid"])):
            entry.unlink(missing_ok=True)
            continue
        marker = server_dir(Path(server["home"])) / "last_used"
        used = marker.stat().st_mtime if marker.exists() else float(server["started_at"])
        found.append(server | {"idle_s": time.time() - used})
    return found


def _reap(pid: int) -> None:
    with suppress(ChildProcessError):  # a server this process started is its child: collect it
        os.waitpid(pid, os.WNOHANG)


def start_early(home: Path) -> None:
    """Start this home's server, unless the user configured an API, without waiting for it.

    Best effort: whatever goes wrong here is found again, and reported, by ``prefect_api``.
    """
    with suppress(Exception):
        if configured_api_url() is None:
            ensure_server(home, wait=False)


class ServerLost(ServerError):
    """The home's server stopped while a run used it: nothing could record the run's states."""


WATCH_INTERVAL_S = 2.0
LOST_REPEAT_S = 15.0  # a lost server's interrupt is repeated this often until the run stops
LOST_GRACE_S = 60.0  # then the process records its runs FAILED and exits


def lost_message(info: ServerInfo) -> str:
    return (
        f"the home's Prefect server (pid {info.pid}, {info.url}) stopped during the run; "
        "the run is marked FAILED. Run again: a new server starts"
    )


@contextmanager
def watched(info: ServerInfo, home: Path) -> Iterator[None]:
    """Interrupt the run if the server it reports to stops (killed, or `fulltune server stop`).

    Without it a run trains on, then waits on a dead API to record its end. A thread checks the
    server's process every ``WATCH_INTERVAL_S``; when it is gone the main thread is interrupted
    and :class:`ServerLost` says why.
    """
    import _thread
    import threading

    stop, lost = threading.Event(), threading.Event()

    def watch() -> None:
        while not stop.wait(WATCH_INTERVAL_S):
            touch(home)  # in use: the reaper's idle clock restarts
            if not alive(info.pid):
                lost.set()
                _thread.interrupt_main()
                # An interrupt can be swallowed on its way (Prefect's engine catches it to
                # report a crash to the dead API, and retries that call): until the run has left
                # this block, interrupt again, spaced so the run's own failure handling (marking
                # its MLflow run) has time to finish; after LOST_GRACE_S, leave without it.
                deadline = time.monotonic() + LOST_GRACE_S
                while not stop.wait(LOST_REPEAT_S):
                    if time.monotonic() > deadline:
                        from tasks import tracking

                        tracking.fail_open_runs(lost_message(info))
                        sys.stderr.write(f"fulltune: error: {lost_message(info)}\n")
                        sys.stderr.flush()
                        os._exit(1)
                    _thread.interrupt_main()
                return

    threading.Thread(target=watch, name="fulltune-server-watch", daemon=True).start()
    try:
        yield
    except BaseException as err:
        if lost.is_set():
            raise ServerLost(lost_message(info)) from err
        raise
    finally:
        stop.set()


@contextmanager
def prefect_api(home: Path) -> Iterator[str]:
    """Point Prefect at the user's API if set, else at this home's local server (started once).

    The URL is also exported to the environment for processes this one starts (``prefect
    serve`` runs each flow run in a subprocess).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = configured_api_url()
    if url is not None:
        yield url
        return
    info = ensure_server(home)
    url = info.url
    with (
        restored_environment(PREFECT_API_URL=url),
        temporary_settings(updates={PREFECT_API_URL: url}),
        watched(info, home),
    ):
        yield url


def describe(home: Path) -> dict[str, object]:
    """The home's server as ``fulltune server status`` prints it."""
    info = read_info(home)
    if info is None:
        return {"running": False, "home": str(home)}
    return {
        "running": alive(info.pid) and answers(info),
        "pid": info.pid,
        "api": info.url,
        "ui": info.ui_url,
        "log": str(server_dir(home) / "server.log"),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.started_at)),
    }


if __name__ == "__main__":
    if sys.argv[1] == "reap":  # python -m flows.local_server reap HOME PID (started above)
        reap(Path(sys.argv[2]), int(sys.argv[3]))
    else:  # python -m flows.local_server HOME: start (or find) and print it
        print(json.dumps(ensure_server(Path(sys.argv[1]).resolve(), stays=True).model_dump()))
