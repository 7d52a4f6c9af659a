"""Fake sysfs trees laid out as the kernel lays them out: RAPL powercap zones and power supplies."""

from __future__ import annotations

import os
from pathlib import Path


def write(path: Path, value) -> None:
    """Replace the file whole: a reader never sees it half written (as with the kernel's files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def rapl_tree(root: Path, package_uj: int, dram_uj: int | None = None, max_uj: int = 10_000_000) -> Path:
    """/sys/class/powercap/intel-rapl as the kernel lays it out: package zones and their sub-zones."""
    pkg = root / "intel-rapl" / "intel-rapl:0"
    write(pkg / "name", "package-0")
    write(pkg / "energy_uj", package_uj)
    write(pkg / "max_energy_range_uj", max_uj)
    write(pkg / "intel-rapl:0:0" / "name", "core")  # counted within the package already
    write(pkg / "intel-rapl:0:0" / "energy_uj", 5)
    write(pkg / "intel-rapl:0:0" / "max_energy_range_uj", max_uj)
    if dram_uj is not None:
        write(pkg / "intel-rapl:0:1" / "name", "dram")
        write(pkg / "intel-rapl:0:1" / "energy_uj", dram_uj)
        write(pkg / "intel-rapl:0:1" / "max_energy_range_uj", 1_000_000)
    return root / "intel-rapl"


def battery_tree(root: Path, *, charge: bool = False, status: str = "Discharging", mains: bool = False) -> Path:
    bat = root / "BAT0"
    write(bat / "type", "Battery")
    write(bat / "status", status)
    if charge:  # charge_now (uAh) x voltage_now (uV)
        write(bat / "charge_now", 2_000_000)  # 2 Ah
        write(bat / "charge_full", 4_000_000)
        write(bat / "voltage_now", 12_000_000)  # 12 V: 24 Wh
    else:
        write(bat / "energy_now", 30_000_000)  # 30 Wh
        write(bat / "energy_full", 60_000_000)
        write(bat / "capacity", 50)
    write(root / "AC" / "type", "Mains")
    write(root / "AC" / "online", int(mains))
    return root
