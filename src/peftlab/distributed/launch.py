"""``peftlab train --nproc N [--nnodes M --node-rank R --master-addr A | --rdzv-endpoint A:P]``: torchrun for you.

The command re-runs itself, minus the launch flags, under ``torchrun`` (``torch.distributed.run``):

* one machine (``--nproc N``): ``--standalone``, which picks a free rendezvous port on localhost, so
  several runs on one machine do not collide;
* several machines, fixed ranks (``--nnodes M --node-rank R --master-addr A [--master-port P]``): the
  static rendezvous; node 0 hosts it at A:P (it must be node 0's own address);
* several machines, elastic (``--nnodes M --rdzv-endpoint A:P [--rdzv-id ID]``): the c10d rendezvous;
  whichever node owns A hosts it, ranks are assigned as nodes join.

Before any rank starts, a node that is not the host waits for the rendezvous address to accept a
connection (``--rdzv-timeout``, default 45 s) and stops with one sentence when it does not; torchrun's
own rendezvous gets the same timeout, and a rendezvous that fails inside torchrun (too few nodes joined,
the port in use) is reported in one sentence too instead of torchrun's traceback
(``PEFTLAB_DEBUG=1`` prints it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from peftlab.distributed.env import STARTED_MARKER_ENV, child_dies_with_us, is_main_process
from peftlab.errors import PeftlabError

DEFAULT_MASTER_PORT = 29500  # torchrun's
DEFAULT_RDZV_PORT = 29400  # torchrun's for --rdzv-endpoint without a port
DEFAULT_RDZV_TIMEOUT = 45.0  # seconds; a node that cannot reach the rendezvous says so well within a minute
DEFAULT_RDZV_ID = "peftlab"
# after the rendezvous timeout, how long the launcher still waits for a first rank to start (imports of
# torch and transformers on a busy machine) before it ends a rendezvous that torchrun did not
RANK_START_GRACE = 60.0

# flag -> LaunchOptions field; each takes one value. The ranks get the command without them.
LAUNCH_FLAGS = {"--nproc": "nproc", "--nnodes": "nnodes", "--node-rank": "node_rank", "--master-addr": "master_addr",
                "--master-port": "master_port", "--rdzv-endpoint": "rdzv_endpoint", "--rdzv-id": "rdzv_id",
                "--rdzv-timeout": "rdzv_timeout"}
LAUNCH_HELP = {
    "nnodes": "machines taking part (multi-node: with --master-addr and --node-rank, or --rdzv-endpoint)",
    "node_rank": "this machine's number, 0 .. nnodes-1 (with --master-addr; node 0 hosts the rendezvous)",
    "master_addr": "node 0's address, the rendezvous every node connects to",
    "master_port": f"the rendezvous port on node 0 (default {DEFAULT_MASTER_PORT})",
    "rdzv_endpoint": f"HOST[:PORT] of an elastic (c10d) rendezvous instead of --master-addr (port default {DEFAULT_RDZV_PORT})",
    "rdzv_id": f"the job's name at the rendezvous, the same on every node (default '{DEFAULT_RDZV_ID}')",
    "rdzv_timeout": f"seconds to wait for the rendezvous before giving up with one sentence (default {DEFAULT_RDZV_TIMEOUT:g})",
}


@dataclass(frozen=True)
class LaunchOptions:
    """How many processes on how many machines, and where they meet."""

    nproc: int = 1  # ranks on this machine
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_timeout: float = DEFAULT_RDZV_TIMEOUT

    @classmethod
    def from_namespace(cls, args) -> "LaunchOptions":
        """From parsed CLI flags (absent or None: the default)."""
        values = {}
        for field in dataclasses.fields(cls):
            value = getattr(args, field.name, None)
            if value is not None:
                values[field.name] = value
        return cls(**values)

    @property
    def multi_node(self) -> bool:
        return int(self.nnodes) > 1

    @property
    def needs_launcher(self) -> bool:
        return int(self.nproc) > 1 or self.multi_node

    @property
    def elastic(self) -> bool:
        return self.rdzv_endpoint is not None

    def rendezvous(self) -> tuple[str, int]:
        """(host, port) of the rendezvous (multi-node only)."""
        if self.elastic:
            return split_endpoint(self.rdzv_endpoint)
        return str(self.master_addr), int(self.master_port or DEFAULT_MASTER_PORT)

    def hosts_rendezvous(self) -> bool | None:
        """Whether this node hosts the rendezvous: True, False, or None (elastic on a local address: torch decides)."""
        if not self.elastic:
            return int(self.node_rank or 0) == 0
        return False if not is_local_address(self.rendezvous()[0]) else None

    def check(self) -> "LaunchOptions":
        """Refuse impossible or silently-ignored combinations (one sentence each); returns self."""
        for name in ("nproc", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PeftlabError(f"--{name} must be a positive number; got {value!r}.")
        if not isinstance(self.rdzv_timeout, (int, float)) or self.rdzv_timeout <= 0:
            raise PeftlabError(f"--rdzv-timeout must be a positive number of seconds; got {self.rdzv_timeout!r}.")
        given = [flag for flag, field in LAUNCH_FLAGS.items()
                 if field in ("node_rank", "master_addr", "master_port", "rdzv_endpoint", "rdzv_id")
                 and getattr(self, field) is not None]
        if not self.multi_node:
            if given:
                raise PeftlabError(f"{given[0]} is for a run over several machines: add --nnodes N (N > 1), or drop it "
                                   "(one machine needs only --nproc).")
            return self
        if self.master_addr is not None and self.elastic:
            raise PeftlabError("Give one rendezvous: --master-addr (fixed node ranks) or --rdzv-endpoint (elastic), "
                               "not both.")
        if self.master_addr is None and not self.elastic:
            raise PeftlabError(f"--nnodes {self.nnodes} needs the address where the nodes meet: --master-addr HOST "
                               "--node-rank R (node 0 is HOST), or --rdzv-endpoint HOST:PORT; the same on every node.")
        if self.elastic:
            if self.node_rank is not None or self.master_port is not None:
                raise PeftlabError("--node-rank and --master-port go with --master-addr; with --rdzv-endpoint the "
                                   "port is part of the endpoint and node ranks are assigned as nodes join.")
            split_endpoint(self.rdzv_endpoint)
        else:
            if self.rdzv_id is not None:
                raise PeftlabError("--rdzv-id goes with --rdzv-endpoint; with --master-addr the nodes are told apart "
                                   "by --node-rank.")
            if self.node_rank is None:
                others = "1" if self.nnodes == 2 else f"1 .. {self.nnodes - 1}"
                raise PeftlabError(f"--master-addr needs --node-rank: 0 on {self.master_addr} (it hosts the "
                                   f"rendezvous), {others} on the other node{'s' if self.nnodes > 2 else ''}.")
            if not 0 <= int(self.node_rank) < int(self.nnodes):
                raise PeftlabError(f"--node-rank must be between 0 and {self.nnodes - 1} for --nnodes {self.nnodes}; "
                                   f"got {self.node_rank}.")
            _check_port(self.master_port or DEFAULT_MASTER_PORT, "--master-port")
        return self

    def torchrun_arguments(self) -> list[str]:
        """torchrun's own flags for these options."""
        if not self.multi_node:
            return ["--standalone", f"--nproc_per_node={self.nproc}"]
        host, port = self.rendezvous()
        timeout = int(max(1, round(self.rdzv_timeout)))
        common = [f"--nnodes={self.nnodes}", f"--nproc_per_node={self.nproc}", "--max_restarts=0"]
        if self.elastic:
            return [*common, "--rdzv_backend=c10d", f"--rdzv_endpoint={host}:{port}",
                    f"--rdzv_id={self.rdzv_id or DEFAULT_RDZV_ID}", f"--rdzv_conf=join_timeout={timeout},read_timeout={timeout}"]
        return [*common, f"--node_rank={self.node_rank}", f"--master_addr={host}", f"--master_port={port}",
                f"--rdzv_conf=timeout={timeout}"]


def _check_port(port, flag: str) -> int:
    try:
        value = int(port)
    except (TypeError, ValueError):
        value = -1
    if not 0 < value < 65536:
        raise PeftlabError(f"{flag} must be a port number between 1 and 65535; got {port!r}.")
    return value


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' (or 'host', or '[v6]:port') -> (host, port)."""
    text = str(endpoint).strip()
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<host>[^:\s]+)(?::(?P<port>[^:]*))?", text)
    if not text or not match:
        raise PeftlabError(f"--rdzv-endpoint must be HOST or HOST:PORT; got '{endpoint}'.")
    host = match.group("v6") or match.group("host")
    port = match.group("p6") or match.group("port")
    return host, _check_port(port if port is not None else DEFAULT_RDZV_PORT, "--rdzv-endpoint's port")


def is_local_address(host: str) -> bool:
    """Whether ``host`` names this machine (a loopback address, or one a socket can bind to here)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, address in infos:
        ip = address[0]
        try:
            if ipaddress.ip_address(ip.split("%")[0]).is_loopback:
                return True
        except ValueError:
            continue
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((ip, 0))
            return True
        except OSError:
            continue
    return False


def wait_for_rendezvous(host: str, port: int, timeout: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; one sentence when it does not within ``timeout`` s."""
    try:
        socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as error:
        raise PeftlabError(f"Cannot resolve the rendezvous host '{host}' ({error.strerror}): give node 0's address "
                           "or a name every node can resolve.") from None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining))):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise PeftlabError(
                f"No rendezvous at {host}:{port}: nothing accepted a connection there within {timeout:g} s. Start the "
                "node that hosts it (node 0) first, check the address, the port and that no firewall blocks them, "
                "or wait longer with --rdzv-timeout SECONDS.")
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def check_host_side(launch: LaunchOptions) -> None:
    """Before starting the rendezvous on this node: its address must be this machine's, its port free."""
    host, port = launch.rendezvous()
    if not is_local_address(host):
        raise PeftlabError(f"--node-rank 0 hosts the rendezvous, but --master-addr {host} is not an address of this "
                           "machine: run node 0 on that machine, or give this machine's own address.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            raise PeftlabError(f"Port {port} is already in use on this machine, so the rendezvous cannot start there: "
                               "choose another --master-port (the same on every node).") from None


# ---- the torchrun command ------------------------------------------------------------------------

def strip_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` without the launch flags (``--nproc 2``, ``--nnodes=2``, ...): the ranks must not relaunch."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in LAUNCH_FLAGS and "=" in arg:
            continue
        out.append(arg)
    return out


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (and the other launch flags)."""
    return strip_launch_flags(argv)


def torchrun_command(launch: int | LaunchOptions, argv: list[str]) -> list[str]:
    """The ``torchrun`` command line that runs ``peftlab <argv>`` as ``launch`` says (an int: ranks on this machine)."""
    if not isinstance(launch, LaunchOptions):
        launch = LaunchOptions(nproc=launch)
    return [sys.executable, "-m", "torch.distributed.run", *launch.torchrun_arguments(),
            "-m", "peftlab.cli", *strip_launch_flags(argv)]


def relaunch(launch: int | LaunchOptions, argv: list[str]) -> int:
    """Run ``peftlab <argv>`` (minus the launch flags) under ``torchrun``; its exit code.

    On CPU each rank gets ``cpu_count // nproc`` intra-op threads (OMP_NUM_THREADS), so the ranks
    do not oversubscribe the cores; an explicit OMP_NUM_THREADS wins. The ranks stay in this
    process group, so Ctrl-C (or a kill of the group) reaches all of them. A multi-node launch first
    checks the rendezvous (see the module docstring).
    """
    import torch

    from peftlab.hardware import cpu_count

    if not isinstance(launch, LaunchOptions):
        if not isinstance(launch, int) or isinstance(launch, bool) or launch < 1:
            raise PeftlabError(f"--nproc must be a positive number of processes; got {launch!r}.")
        launch = LaunchOptions(nproc=launch)
    launch.check()
    on_gpu = torch.cuda.is_available()
    if on_gpu and launch.nproc > torch.cuda.device_count():
        raise PeftlabError(f"--nproc {launch.nproc} asks for more processes than this machine has GPUs "
                           f"({torch.cuda.device_count()}); each rank needs its own GPU.")
    if launch.multi_node:
        hosts = launch.hosts_rendezvous()
        if hosts is True:
            check_host_side(launch)
        elif hosts is False:
            wait_for_rendezvous(*launch.rendezvous(), launch.rdzv_timeout)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // launch.nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = torchrun_command(launch, argv)
    if is_main_process():
        backend = "nccl" if on_gpu else "gloo"
        where = (f" on node {launch.node_rank} of {launch.nnodes}" if launch.node_rank is not None else
                 f" on one of {launch.nnodes} nodes") if launch.multi_node else ""
        print(f"peftlab: launching {launch.nproc} data-parallel process{'es' if launch.nproc > 1 else ''}{where} "
              f"({backend}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}) with torchrun", file=sys.stderr, flush=True)
    if launch.multi_node:
        return _run_reporting_rendezvous(command, env, launch)
    return _run(command, env)


def _popen(command: list[str], env: dict[str, str], **options) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, preexec_fn=child_dies_with_us if sys.platform.startswith("linux") else None,
                            **options)


def _wait(process: subprocess.Popen) -> int:
    try:
        return process.wait()
    except KeyboardInterrupt:
        # the ranks got the same SIGINT (same process group); let torchrun shut them down
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return 130


def _wait_for_start(process: subprocess.Popen, marker: Path, deadline_seconds: float) -> tuple[int, bool]:
    """Wait for ``process``; stop it if no rank has started ``deadline_seconds`` after the launch.
    Returns (exit code, whether it was stopped for that).

    torchrun's own rendezvous timeouts normally end a failed rendezvous first; this is the guarantee
    against network paths where they do not (a middlebox that accepts connections and never answers).
    """
    deadline = time.monotonic() + deadline_seconds
    while not marker.exists():
        try:
            return process.wait(timeout=max(0.1, min(1.0, deadline - time.monotonic()))), False
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                return process.wait(), True
        except KeyboardInterrupt:
            return _wait(process), False
    return _wait(process), False


def _run(command: list[str], env: dict[str, str]) -> int:
    return _wait(_popen(command, env))


def _run_reporting_rendezvous(command: list[str], env: dict[str, str], launch: LaunchOptions) -> int:
    """Run torchrun holding back its stderr until a rank has started; a failed rendezvous -> one sentence."""
    with tempfile.TemporaryDirectory(prefix="peftlab-launch-") as folder:
        marker = Path(folder) / "started"
        process = _popen(command, {**env, STARTED_MARKER_ENV: str(marker)}, stderr=subprocess.PIPE)
        held: list[bytes] = []
        released = threading.Event()

        def pump():
            stream = process.stderr
            out = getattr(sys.stderr, "buffer", None)
            while True:
                ready, _, _ = select.select([stream], [], [], 0.5)
                if not released.is_set() and marker.exists():
                    released.set()
                    _write(out, b"".join(held))
                    held.clear()
                if not ready:
                    if process.poll() is not None:
                        break
                    continue
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    break
                if released.is_set():
                    _write(out, chunk)
                else:
                    held.append(chunk)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        code, stopped = _wait_for_start(process, marker, launch.rdzv_timeout + RANK_START_GRACE)
        reader.join(timeout=5)
        started = marker.exists()
    text = b"".join(held).decode(errors="replace")
    if code != 0 and not started:
        if os.environ.get("PEFTLAB_DEBUG"):
            sys.stderr.write(text)
        if stopped:
            host, port = launch.rendezvous()
            raise PeftlabError(f"No rank started within {launch.rdzv_timeout + RANK_START_GRACE:g} s: the rendezvous at "
                               f"{host}:{port} did not complete. Check that every node runs the same command and can "
                               "reach it, or raise --rdzv-timeout.")
        raise PeftlabError(rendezvous_failure(text, launch))
    if text:
        sys.stderr.write(text)
    return code


def _write(stream, data: bytes) -> None:
    if not data:
        return
    if stream is None:
        sys.stderr.write(data.decode(errors="replace"))
    else:
        stream.write(data)
        stream.flush()


def rendezvous_failure(output: str, launch: LaunchOptions) -> str:
    """One sentence for torchrun's output when it failed before any rank started."""
    host, port = launch.rendezvous()
    where = f"{host}:{port}"
    joined = re.search(r"(\d+)/(\d+) clients joined", output)
    if joined:
        return (f"The rendezvous at {where} timed out after {launch.rdzv_timeout:g} s with {joined.group(1)} of "
                f"{launch.nnodes} nodes: start the same command on every node (each with its --node-rank) within "
                "--rdzv-timeout seconds, or raise it.")
    if re.search(r"RendezvousConnectionError|trying to connect|Connection refused", output):
        return (f"No rendezvous at {where}: it could not be reached within {launch.rdzv_timeout:g} s. Start the node "
                "that hosts it first, check the address, the port and that no firewall blocks them, or wait longer "
                "with --rdzv-timeout SECONDS.")
    if re.search(r"address already in use|EADDRINUSE", output, re.IGNORECASE):
        return f"Port {port} is already in use on this machine: choose another port for the rendezvous."
    if re.search(r"RendezvousTimeoutError|timed out|timeout", output, re.IGNORECASE):
        return (f"The rendezvous at {where} did not complete within {launch.rdzv_timeout:g} s: check that all "
                f"{launch.nnodes} nodes run the same command with the same --rdzv-id, that {host} is reachable from "
                "every node, or raise --rdzv-timeout.")
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "no output")
    return f"torchrun stopped before any rank started ({last[:300]}); PEFTLAB_DEBUG=1 shows its whole output."
