"""Shared bits of the benches: machine description, free ports, Postfix tools."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import time


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {model}, load {os.getloadavg()[0]:.2f},"
        f" Linux {platform.release()}, Python {platform.python_version()}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def program(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else ""
    )
    if not path:
        raise SystemExit(f"{name} not found (apt-get install postfix)")
    return path


def port_open(port: int, timeout: float = 10) -> bool:
    """Wait until something listens on 127.0.0.1:port; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def wait_port(port: int, timeout: float = 10) -> None:
    if not port_open(port, timeout):
        raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def start_smtp_sink(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [program("smtp-sink"), "-4", "-u", "nobody", "-c", f"127.0.0.1:{port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


def run_smtp_source(port: int, sessions: int, count: int, size: int) -> tuple[float, float]:
    """Postfix's C load generator: returns (wall seconds, CPU seconds of the client)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            program("smtp-source"),
            "-4",
            "-d",
            "-s",
            str(sessions),
            "-m",
            str(count),
            "-l",
            str(size),
            "-f",
            "bench@example.com",
            "-t",
            "rcpt@example.net",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _pid, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"smtp-source failed with status {status}")
    return wall, ru.ru_utime + ru.ru_stime


class SmtpSink:
    """Postfix's smtp-sink with its running counter (``-c``) read back, so a bench
    can check what a client delivered against what the server received."""

    def __init__(self, port: int, backlog: int = 1024) -> None:
        import tempfile

        self.port = port
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        cmd = [program("smtp-sink"), "-4", "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{port}", str(backlog)]
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.DEVNULL)
        wait_port(port)

    def messages(self) -> int:
        """Messages received so far (smtp-sink prints "... mesg=N" after each)."""
        time.sleep(0.2)  # its last counter line
        self._out.seek(0)
        text = self._out.read().decode("ascii", "replace")
        i = text.rfind("mesg=")
        if i < 0:
            return 0
        digits = ""
        for ch in text[i + 5 :]:
            if not ch.isdigit():
                break
            digits += ch
        return int(digits or 0)

    def cpu_s(self) -> float:
        """The sink's CPU time so far (user + system, from /proc: 10 ms ticks)."""
        return proc_cpu_s(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self._out.close()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compile_bytecode(package: str) -> str:
    """Compile ``package``'s modules to bytecode, as ``pip install`` does: run
    from a source tree under PYTHONDONTWRITEBYTECODE=1 every launch would
    otherwise compile each module again (~0.1 s), which no installed copy does.
    Returns a line saying so."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} not found")
    where = next(iter(spec.submodule_search_locations))
    ok = compileall.compile_dir(where, quiet=1)
    if not ok:
        raise SystemExit(f"could not compile {where} to bytecode")
    return f"bytecode: {package} at {where} compiled first, as `pip install` does"


def median_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    s = sorted(values)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return med, s[0], s[-1]


def fmt_mr(values: list[float], spec: str = ".0f") -> str:
    med, lo, hi = median_range(values)
    return f"{med:{spec}} ({lo:{spec}}-{hi:{spec}})"
