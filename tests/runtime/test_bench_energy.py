"""Energy sensors against fake sysfs trees: RAPL through zeus (with a wrap-around and without
permission), batteries in their energy and charge variants, mains power, macOS's ioreg."""

from __future__ import annotations

import os
import plistlib
import shutil
import tempfile
from pathlib import Path

import pytest

from edge_spade.bench.energy import (
    BatterySensor,
    OnMainsPower,
    RaplSensor,
    SensorUnavailable,
    open_sensor,
    parse_ioreg,
    read_sysfs_battery,
)
from tests.support.sysfs import battery_tree, rapl_tree, write


def test_rapl_counts_package_and_dram_through_a_wrap(tmp_path):
    root = rapl_tree(tmp_path, package_uj=9_999_000, dram_uj=400)
    sensor = RaplSensor(root)
    assert sensor.source == "rapl" and "package-0" in sensor.detail and "dram" in sensor.detail
    assert sensor.joules() == 0
    write(root / "intel-rapl:0" / "energy_uj", 1_000)  # wrapped past max_energy_range_uj
    write(root / "intel-rapl:0" / "intel-rapl:0:1" / "energy_uj", 900)
    assert sensor.joules() == pytest.approx((2_000 + 500) / 1e6)  # 9,999,000 -> max -> 1,000; dram +500
    write(root / "intel-rapl:0" / "energy_uj", 3_000_000)
    assert sensor.joules() == pytest.approx((2_000 + 500 + 2_999_000) / 1e6)


def test_rapl_absent_or_empty(tmp_path):
    with pytest.raises(SensorUnavailable, match="no RAPL powercap zones"):
        RaplSensor(tmp_path / "nothing")
    (tmp_path / "intel-rapl").mkdir()
    with pytest.raises(SensorUnavailable, match="no RAPL powercap zones"):
        RaplSensor(tmp_path / "intel-rapl")


def _as_unprivileged(fn) -> str:
    """Run `fn` where file permissions apply (a forked child that drops root, when we are root);
    returns what it raised, or "" if nothing."""
    if os.geteuid() != 0:
        try:
            fn()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery past this point
        os.close(read)
        message = ""
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def open_dir():
    """A folder an unprivileged user can enter (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="edge-spade-sysfs-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_rapl_without_permission_says_how_to_grant_it(open_dir):
    folder = open_dir
    root = rapl_tree(folder, package_uj=1000)
    for d in [folder, *folder.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o444)
    (root / "intel-rapl:0" / "energy_uj").chmod(0o400)  # as on Linux since 5.10: root only
    raised = _as_unprivileged(lambda: RaplSensor(root))
    assert raised.startswith("SensorUnavailable: no permission to read"), raised
    assert "chmod" in raised


def test_battery_energy_and_charge_variants(tmp_path):
    energy = read_sysfs_battery(battery_tree(tmp_path / "e"))
    assert energy.energy_j == pytest.approx(30 * 3600) and energy.percent == 50 and not energy.on_mains
    charge = read_sysfs_battery(battery_tree(tmp_path / "c", charge=True))
    assert charge.energy_j == pytest.approx(24 * 3600) and charge.percent == pytest.approx(50)

    root = battery_tree(tmp_path / "d")
    sensor = BatterySensor(lambda: read_sysfs_battery(root))
    write(root / "BAT0" / "energy_now", 29_999_000)  # 1 mWh used
    assert sensor.joules() == pytest.approx(3.6)


def test_battery_on_mains_is_refused_unless_allowed(tmp_path):
    for name, kwargs in {
        "online": {"mains": True},
        "charging": {"status": "Charging"},
        "full": {"status": "Full"},
    }.items():
        root = battery_tree(tmp_path / name, **kwargs)
        with pytest.raises(OnMainsPower, match="--allow-ac"):
            BatterySensor(lambda root=root: read_sysfs_battery(root))
        assert BatterySensor(lambda root=root: read_sysfs_battery(root), allow_mains=True).on_mains


def test_battery_missing_or_unreadable(tmp_path, open_dir):
    with pytest.raises(SensorUnavailable, match="no battery"):
        read_sysfs_battery(tmp_path)
    folder = open_dir
    root = battery_tree(folder)
    for d in [folder, *folder.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o444)
    (root / "BAT0" / "energy_now").chmod(0o400)
    raised = _as_unprivileged(lambda: read_sysfs_battery(root))
    assert raised.startswith("SensorUnavailable: no permission to read"), raised


def test_open_sensor_auto_prefers_rapl_then_a_discharging_battery(tmp_path):
    rapl = rapl_tree(tmp_path / "powercap", package_uj=10)
    bats = battery_tree(tmp_path / "bats")
    sensor, why = open_sensor("auto", powercap=rapl, power_supply=bats)
    assert sensor.source == "rapl" and why is None
    sensor, why = open_sensor("auto", powercap=tmp_path / "none", power_supply=bats)
    assert sensor.source == "battery" and why is None
    on_ac = battery_tree(tmp_path / "ac", mains=True)
    sensor, why = open_sensor("auto", powercap=tmp_path / "none", power_supply=on_ac)
    assert sensor is None and "rapl: no RAPL" in why and "battery: on mains power" in why
    assert open_sensor("none") == (None, "not measured (--energy none)")
    with pytest.raises(SensorUnavailable):
        open_sensor("rapl", powercap=tmp_path / "none")
    with pytest.raises(ValueError):
        open_sensor("gpu")


def test_macos_ioreg_battery():
    plist = plistlib.dumps(
        [{"AppleRawCurrentCapacity": 3000, "AppleRawMaxCapacity": 6000, "Voltage": 12000, "ExternalConnected": False}]
    )
    reading = parse_ioreg(plist)
    assert reading.energy_j == pytest.approx(36 * 3600) and reading.percent == 50 and not reading.on_mains
    on_ac = plistlib.dumps([{"CurrentCapacity": 80, "MaxCapacity": 100, "Voltage": 12000, "ExternalConnected": True}])
    assert parse_ioreg(on_ac).on_mains
    with pytest.raises(SensorUnavailable):
        parse_ioreg(b"not a plist")
    with pytest.raises(SensorUnavailable):
        parse_ioreg(plistlib.dumps([{"Voltage": 1}]))
