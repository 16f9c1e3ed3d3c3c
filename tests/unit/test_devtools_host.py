"""streams.devtools.host: programs found or refused with what to install, children stopped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streams.devtools import host


class Missing(RuntimeError):
    pass


def test_programs_on_path_are_found_and_a_missing_one_makes_none() -> None:
    found = host.find_programs(["sh"])
    assert found is not None and found["sh"].endswith("/sh")
    assert host.find_programs(["sh", "paystream-no-such-program"]) is None


def test_present_programs_need_no_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_apt_install", lambda *a: pytest.fail("nothing to install"))
    assert host.ensure_debian_programs(["coreutils"], ["sh"], Missing) == host.find_programs(["sh"])


def test_without_root_a_missing_program_is_refused_with_the_install_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(host, "_apt_install", lambda *a: pytest.fail("no install without root"))
    with pytest.raises(Missing) as refused:
        host.ensure_debian_programs(["pkg-a", "pkg-b"], ["paystream-no-such-program", "sh"], Missing)
    assert str(refused.value) == (
        "paystream-no-such-program/sh not found: install Debian's pkg-a and pkg-b packages "
        "(`apt-get install -y pkg-a pkg-b`)")


def test_stop_process_terminates_a_child_and_ignores_none_or_an_exited_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host.stop_process(child, timeout=10)
    assert child.returncode is not None
    host.stop_process(child, timeout=10)  # exited already: nothing to do
    host.stop_process(None, timeout=10)


def test_free_port_can_be_bound() -> None:
    import socket

    port = host.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_install_main_prints_the_paths_or_says_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    def ensure(*, quiet: bool) -> dict[str, str]:
        assert quiet is False
        return {"a": "/bin/a", "b": "/bin/b"}

    def refuse(*, quiet: bool) -> dict[str, str]:
        raise Missing("a/b not found: install them")

    assert host.install_main(["prog", "install"], "m.x", ensure, Missing) == 0
    assert capsys.readouterr().out == "a: /bin/a, b: /bin/b\n"
    assert host.install_main(["prog", "install"], "m.x", refuse, Missing) == 1
    assert capsys.readouterr().err == "dev: a/b not found: install them\n"
    assert host.install_main(["prog"], "m.x", ensure, Missing) == 2
    assert capsys.readouterr().err == "usage: python -m m.x install\n"
