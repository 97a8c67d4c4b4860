"""A third-party plugin, really installed: negotiated, answered, documented; and the errors."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pynetdicom.association
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from servers.core import config as config_mod
from servers.core.declaration import StartupError
from servers.core.runtime import Suite
from servers.core.statement import render
from tests.helpers import associate

FIXTURE = Path(__file__).with_name("plugin_fixture") / "dicomlab_demo_plugin.py"
SOURCE = FIXTURE.read_text(encoding="utf-8")
PRIVATE = "2.25.160310232312938826227446389916290410771"
VERIFICATION = "1.2.840.10008.1.1"
ARCHIVE_SERVICES = ["verification", "demo_echo"]

Installer = Callable[..., Path]


@pytest.fixture
def install_plugin(tmp_path: Path) -> Iterator[Installer]:
    """Install plugin modules the way pip would: module + ``*.dist-info`` on sys.path."""
    site = tmp_path / "site-packages"
    site.mkdir()
    sys.path.insert(0, str(site))
    modules: list[str] = []

    def install(module: str, service: str, source: str | None = None) -> Path:
        if source is not None:
            (site / f"{module}.py").write_text(source, encoding="utf-8")
        dist = site / f"{module}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n", encoding="utf-8"
        )
        (dist / "entry_points.txt").write_text(
            f"[dicomlab]\n{service} = {module}\n", encoding="utf-8"
        )
        modules.append(module)
        importlib.invalidate_caches()
        return site

    yield install
    sys.path.remove(str(site))
    for module in modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
    installed = {ep.name for ep in importlib.metadata.entry_points(group="dicomlab")}
    assert "demo_echo" not in installed, "the demo plugin leaked out of its test"


def echo_on(assoc: pynetdicom.association.Association, sop_class: str, monkeypatch) -> int:
    """C-ECHO-RQ with ``sop_class`` as its Affected SOP Class, via pynetdicom's own path."""
    with monkeypatch.context() as patch:
        patch.setattr(pynetdicom.association, "Verification", sop_class)
        return int(assoc.send_c_echo().Status)


def config_with(tmp_path: Path, services: list[str], **extra: object) -> config_mod.Config:
    return config_mod.load(
        path=None,
        environ={},
        overrides={
            "data_dir": str(tmp_path / "data"),
            "ae": {"storage_scp": {"services": services}},
            **extra,
        },
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_installed_plugin_is_negotiated_answered_and_documented(
    install_plugin: Installer, make_suite, monkeypatch
) -> None:
    install_plugin("dicomlab_demo_plugin", "demo_echo", SOURCE)
    entry_points = importlib.metadata.entry_points(group="dicomlab")
    assert "demo_echo" in {ep.name for ep in entry_points}

    suite = make_suite({"ae": {"storage_scp": {"services": ARCHIVE_SERVICES}}})
    with associate(
        suite, "storage_scp", [(PRIVATE, [ImplicitVRLittleEndian]), VERIFICATION]
    ) as assoc:
        assert PRIVATE in {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert echo_on(assoc, PRIVATE, monkeypatch) == 0x0000
        assert assoc.send_c_echo().Status == 0x0000

    failing = make_suite(
        {
            "ae": {"storage_scp": {"services": ARCHIVE_SERVICES}},
            "services": {"demo_echo": {"answer": "fail"}},
        }
    )
    with associate(
        failing, "storage_scp", [(PRIVATE, [ImplicitVRLittleEndian]), VERIFICATION]
    ) as assoc:
        assert echo_on(assoc, PRIVATE, monkeypatch) == 0x0110
        # The plugin's failure is its own: the AE keeps serving.
        assert assoc.send_c_echo().Status == 0x0000

    # Not configured on query_scp: the private class is rejected there (abstract syntax).
    with associate(
        suite, "query_scp", [(PRIVATE, [ImplicitVRLittleEndian]), VERIFICATION]
    ) as assoc:
        assert [cx.result for cx in assoc.rejected_contexts] == [3]

    text = render(failing.config, "archive")
    assert f"| Demo Private Echo SOP Class | `{PRIVATE}` | No | Yes |" in text
    assert "SOP Specific Conformance for Demo Private Echo" in text
    assert "C-ECHO response status for Demo Private Echo on EX_STORE_SCP" in text
    assert '| Success | Success | 0000 | The setting `answer` is "ok" (the default). |' in text
    assert "| Failure | Processing failure | 0110 | The setting `answer` is " in text
    assert '`services.demo_echo.answer` | Yes | "fail" |' in text


def test_two_plugins_claiming_one_sop_class_stop_startup(
    install_plugin: Installer, tmp_path: Path
) -> None:
    install_plugin("dicomlab_demo_plugin", "demo_echo", SOURCE)
    twin = SOURCE.replace('NAME = "demo_echo"', 'NAME = "demo_twin"')
    assert twin != SOURCE
    install_plugin("dicomlab_demo_twin", "demo_twin", twin)
    config = config_with(tmp_path, ["verification", "demo_echo", "demo_twin"])
    with pytest.raises(StartupError) as caught:
        Suite.create(config, migrate=False)
    message = str(caught.value)
    assert "'demo_echo'" in message and "'demo_twin'" in message
    assert PRIVATE in message
    assert "[ae.storage_scp]" in message
    # The statement refuses the same configuration for the same reason.
    with pytest.raises(StartupError, match="both claim"):
        render(config, "archive")


def test_service_named_but_not_installed_is_a_clear_error(tmp_path: Path) -> None:
    config = config_with(tmp_path, ["verification", "demo_echo"])
    with pytest.raises(StartupError) as caught:
        Suite.create(config, migrate=False)
    message = str(caught.value)
    assert "[ae.storage_scp] names service 'demo_echo'" in message
    assert "no installed plugin provides" in message
    assert "verification" in message  # what is available instead


def test_service_named_but_not_installed_fails_serve_with_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMLAB_")}
    env.update(
        DICOMLAB_DATA_DIR=str(tmp_path / "data"),
        DICOMLAB_AE__STORAGE_SCP__SERVICES='["verification", "demo_echo"]',
    )
    done = subprocess.run(
        [sys.executable, "-m", "servers.core.cli", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "names service 'demo_echo', which no installed plugin provides" in done.stderr


def test_plugin_that_fails_to_import_is_a_clear_error(
    install_plugin: Installer, tmp_path: Path
) -> None:
    install_plugin("dicomlab_broken_plugin", "broken")  # entry point, but no module
    with pytest.raises(StartupError, match="failed to load: ModuleNotFoundError"):
        Suite.create(config_with(tmp_path, ["verification"]), migrate=False)
