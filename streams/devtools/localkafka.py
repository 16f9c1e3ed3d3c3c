"""A real single-node Apache Kafka for development and tests, without Docker.

The broker's jars come from Maven Central (resolved once with Maven into a
cache directory), storage is formatted for KRaft, and the broker runs as a
child process whose pid, config and logs live in a state directory.  Only the
pid we started is ever signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.paystream</groupId>
  <artifactId>local-kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {logs}/server.log
appender.file.filePattern = {logs}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.kafka.additivity = false
logger.kafka.appenderRef.file.ref = file
logger.raft.name = org.apache.kafka.raft
logger.raft.level = WARN
"""


class LocalKafkaError(RuntimeError):
    """The local broker could not be set up, started or stopped."""


def default_cache_dir() -> Path:
    """Where resolved jars are kept across runs (shared by every state dir)."""
    base = os.environ.get("PAYSTREAM_KAFKA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "paystream"
    )
    return Path(base) / f"kafka-{KAFKA_VERSION}"


def require_tools(*tools: str) -> None:
    """Fail with the exact thing to install when a tool is missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    hints = {
        "java": "a Java 17+ runtime (Debian: `apt-get install -y openjdk-17-jre-headless`)",
        "mvn": "Apache Maven (Debian: `apt-get install -y maven`)",
    }
    raise LocalKafkaError(
        "missing " + ", ".join(missing) + ": install " + " and ".join(hints[t] for t in missing)
    )


def resolve_jars(cache_dir: Path | None = None, *, quiet: bool = True) -> Path:
    """Resolve the pinned broker and its runtime dependencies; return the lib dir.

    A ``.complete`` marker makes later calls free, and a half-finished resolve
    (interrupted download) is redone rather than trusted.
    """
    cache = cache_dir or default_cache_dir()
    lib = cache / "lib"
    marker = cache / ".complete"
    if marker.exists() and any(lib.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        return lib
    require_tools("mvn", "java")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
    if lib.exists():
        shutil.rmtree(lib)
    command = [
        "mvn", "-B", "-f", str(cache / "pom.xml"),
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={lib}",
    ]
    if quiet:
        command.insert(1, "-q")
    result = subprocess.run(command, capture_output=quiet, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stdout or "")[-2000:] + (result.stderr or "")[-2000:]
        raise LocalKafkaError(f"maven could not resolve Kafka {KAFKA_VERSION}:\n{detail}")
    marker.write_text(KAFKA_VERSION + "\n")
    return lib


@dataclass
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    answering: bool

    def describe(self) -> str:
        if not self.running:
            return f"kafka: stopped ({self.bootstrap})"
        state = "answering" if self.answering else "not answering yet"
        return f"kafka: running, pid {self.pid}, {self.bootstrap}, {state}"


class LocalKafka:
    """One single-node KRaft broker+controller living in ``home``."""

    def __init__(
        self,
        home: Path,
        *,
        port: int = 9092,
        controller_port: int | None = None,
        host: str = "localhost",
        cache_dir: Path | None = None,
        heap: str = "1g",
    ) -> None:
        self.home = Path(home).resolve()
        self.host = host
        self.port = port
        self.controller_port = controller_port or port + 1
        self.cache_dir = cache_dir or default_cache_dir()
        self.heap = heap

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pid_file(self) -> Path:
        return self.home / "kafka.pid"

    def _properties(self) -> str:
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{self.host}:{self.controller_port}",
            f"listeners=PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={self.data_dir}",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            "group.initial.rebalance.delay.ms=0",
            "num.partitions=1",
            "log.retention.hours=168",
            "log.cleaner.enable=true",
            "delete.topic.enable=true",
            "",
        ])

    def _java(self, lib: Path, main: str, *args: str) -> list[str]:
        return [
            "java", f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp", f"{lib}/*", main, *args,
        ]

    def pid(self) -> int | None:
        """The pid of the broker we started, if that process still lives."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"kafka.Kafka" not in cmdline.read_bytes():
            return None  # the pid was reused by an unrelated process
        return pid

    def answering(self, timeout: float = 2.0) -> bool:
        """True when the broker answers a metadata request."""
        from confluent_kafka.admin import AdminClient

        if not _port_open(self.host, self.port):
            return False
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000})
        try:
            return bool(admin.list_topics(timeout=timeout).brokers)
        except Exception:
            return False

    def status(self) -> BrokerStatus:
        pid = self.pid()
        return BrokerStatus(pid is not None, pid, self.bootstrap, pid is not None and self.answering())

    def start(self, *, timeout: float = 90.0) -> float:
        """Start the broker (idempotent) and return the seconds it took."""
        began = time.monotonic()
        if self.pid() is not None:
            if self._wait_answering(timeout):
                return time.monotonic() - began
            raise LocalKafkaError(f"broker pid {self.pid()} is running but does not answer")
        if _port_open(self.host, self.port):
            raise LocalKafkaError(
                f"port {self.port} is taken by a process this state dir did not start "
                f"({self.home}); stop it or pick another port"
            )
        require_tools("java")
        lib = resolve_jars(self.cache_dir)
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        properties = self.home / "server.properties"
        properties.write_text(self._properties())
        (self.home / "log4j2.properties").write_text(_LOG4J2.format(logs=self.logs_dir))
        if not (self.data_dir / "meta.properties").exists():
            self._format(lib, properties)
        out = open(self.logs_dir / "server.out", "ab")
        process = subprocess.Popen(
            self._java(lib, "kafka.Kafka", str(properties)),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_more_open_files,
        )
        out.close()
        self.pid_file.write_text(f"{process.pid}\n")
        if not self._wait_answering(timeout, process):
            self.stop()
            raise LocalKafkaError(
                f"broker did not answer within {timeout:.0f}s; see {self.logs_dir}/server.log"
            )
        return time.monotonic() - began

    def _format(self, lib: Path, properties: Path) -> None:
        cluster_id = _cluster_id()
        result = subprocess.run(
            # "--cluster-id=<id>" in one argument: an id may start with "-" (url-safe
            # base64), which the tool would read as an option (about 1 in 64 ids).
            self._java(lib, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                       "-c", str(properties), "--ignore-formatted"),
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise LocalKafkaError(f"formatting KRaft storage failed:\n{result.stdout}{result.stderr}")

    def _wait_answering(self, timeout: float, process: subprocess.Popen[bytes] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                return False
            if self.answering():
                return True
            time.sleep(0.25)
        return False

    def stop(self, *, timeout: float = 30.0) -> bool:
        """Stop the broker we started; return False if none was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True


#: Open files the broker may hold: each partition keeps a few (segment, indexes),
#: and a test session creates thousands of partitions.
BROKER_OPEN_FILES = 262_144


def _more_open_files() -> None:
    """Raise the broker's open-file limit as far as this user may (in the child, before exec)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (BROKER_OPEN_FILES, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
            return
        except (ValueError, OSError):  # not allowed to raise the hard limit: the soft one then
            continue


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, url-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    if status.exists() and "\nState:\tZ" in status.read_text():
        return False
    return True


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def from_settings(state_dir: Path, bootstrap_servers: str, port: int | None = None) -> LocalKafka:
    """The local broker for these settings (its port from the bootstrap address)."""
    host, _, bootstrap_port = bootstrap_servers.split(",")[0].rpartition(":")
    return LocalKafka(
        Path(state_dir) / "kafka", host=host or "localhost", port=port or int(bootstrap_port)
    )


def main_start(kafka: LocalKafka) -> int:
    try:
        seconds = kafka.start()
    except LocalKafkaError as exc:
        print(f"kafka: {exc}", file=sys.stderr)
        return 1
    print(f"kafka: Apache Kafka {KAFKA_VERSION} answering on {kafka.bootstrap} "
          f"(started in {seconds:.1f}s; logs in {kafka.logs_dir})")
    return 0
