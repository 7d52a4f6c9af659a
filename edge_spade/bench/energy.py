"""Energy from real sensors: RAPL through zeus, Apple Silicon through zeus-apple-silicon, or the
battery's own discharge. Never an estimate: where nothing can be read, `open_sensor` says why.

Each sensor is a cumulative counter in joules that the benchmark reads before and after each
answer (RAPL, Apple) or at the ends of blocks of answers (a battery, whose reading moves every
few seconds).
"""

from __future__ import annotations

import logging
import platform
import plistlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap/intel-rapl")  # zeus's RAPL_DIR: packages are intel-rapl:N below it
POWER_SUPPLY = Path("/sys/class/power_supply")
KINDS = ("auto", "rapl", "apple", "battery", "none")
RAPL_HELP = (
    "Linux lets only root read RAPL counters (since 5.10): run as root, or once per boot "
    "`sudo chmod a+r /sys/class/powercap/intel-rapl/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl/intel-rapl:*/intel-rapl:*/energy_uj`"
)


class SensorUnavailable(Exception):
    """No reading possible from this sensor here; the message says why."""


class OnMainsPower(Exception):
    """Battery energy asked for while the machine runs on mains power."""


class Sensor:
    """A cumulative energy counter in joules."""

    source: str  # "rapl" | "apple" | "battery"
    detail: str  # what exactly is counted
    per_answer: bool = True  # whether readings are fine-grained enough to read around each answer

    def joules(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Counter:
    """One RAPL energy_uj file, unwrapped: the counter restarts at zero past max_energy_range_uj.
    Read at least once per wrap period (minutes at full package power; the benchmark reads it
    around every answer), a drop means exactly one wrap."""

    def __init__(self, path: str, max_uj: float) -> None:
        self.path, self.max_uj = path, max_uj
        self.last = self._raw()
        self.total_uj = 0.0

    def _raw(self) -> float:
        with open(self.path) as f:
            return float(f.read().strip())

    def read_uj(self) -> float:
        value = self._raw()
        delta = value - self.last
        if delta < 0:
            delta += self.max_uj
        self.total_uj += delta
        self.last = value
        return self.total_uj


class RaplSensor(Sensor):
    """CPU package (and DRAM where the platform has that zone) energy of every package, found and
    opened with zeus's RAPL classes. zeus's own wrap tracker polls in a child process; reading around
    every answer makes one unnecessary, and a poller would compete for the cores being measured."""

    source = "rapl"

    def __init__(self, root: Path = POWERCAP) -> None:
        try:
            from zeus.device.cpu.common import ZeusCPUNoPermissionError
            from zeus.device.cpu.rapl import RAPLCPU, ZeusRAPLFileInitError
        except ImportError:
            raise SensorUnavailable("RAPL is read with zeus: pip install 'edge-spade[bench]'") from None
        packages = sorted(
            int(p.name.split(":")[1]) for p in _listdir(root) if p.name.count(":") == 1 and p.name[-1].isdigit()
        )
        if not packages:
            raise SensorUnavailable(f"no RAPL powercap zones under {root} (a VM, or a CPU or kernel without RAPL)")
        self._counters: list[_Counter] = []
        zones = []
        for index in packages:
            try:
                cpu = RAPLCPU(index, str(root))
            except ZeusCPUNoPermissionError:
                raise SensorUnavailable(
                    f"no permission to read {root}/intel-rapl:{index}/energy_uj. {RAPL_HELP}"
                ) from None
            except (ZeusRAPLFileInitError, OSError) as exc:
                raise SensorUnavailable(f"cannot read RAPL zone intel-rapl:{index}: {exc}") from None
            for zone in (cpu.rapl_file, cpu.dram):
                if zone is not None:
                    self._counters.append(_Counter(zone.energy_uj_path, zone.max_energy_range_uj))
                    zones.append(f"{zone.name} (intel-rapl:{index})")
        self.detail = "RAPL via zeus: " + ", ".join(zones)

    def joules(self) -> float:
        return sum(c.read_uj() for c in self._counters) / 1e6


def _listdir(root: Path) -> list[Path]:
    try:
        return list(root.iterdir())
    except OSError:
        return []


class AppleSensor(Sensor):
    """CPU, GPU, ANE and DRAM energy of an Apple Silicon Mac from zeus-apple-silicon (IOReport, no sudo)."""

    source = "apple"
    FIELDS = ("cpu_total_mj", "gpu_mj", "gpu_sram_mj", "ane_mj", "dram_mj")

    def __init__(self) -> None:
        if sys.platform != "darwin" or platform.machine() != "arm64":
            raise SensorUnavailable("Apple Silicon energy needs an Apple Silicon Mac")
        try:
            from zeus_apple_silicon import AppleEnergyMonitor
        except ImportError:
            raise SensorUnavailable(
                "Apple Silicon energy is read with zeus-apple-silicon: pip install 'edge-spade[bench]'"
            ) from None
        try:
            self._monitor = AppleEnergyMonitor()
            counted = [f for f in self.FIELDS if getattr(self._monitor.get_cumulative_energy(), f, None) is not None]
        except Exception as exc:  # the library raises its own errors when IOReport is unavailable
            raise SensorUnavailable(f"zeus-apple-silicon could not read energy: {exc}") from None
        self.detail = "zeus-apple-silicon: " + ", ".join(f.removesuffix("_mj") for f in counted)

    def joules(self) -> float:
        m = self._monitor.get_cumulative_energy()
        return sum(getattr(m, f, None) or 0 for f in self.FIELDS) / 1000


@dataclass(frozen=True)
class BatteryReading:
    energy_j: float  # energy left in the battery
    percent: float
    on_mains: bool
    name: str


def read_sysfs_battery(root: Path = POWER_SUPPLY) -> BatteryReading:
    """The first battery under a Linux power_supply tree: energy_now (uWh), or charge_now (uAh) x
    voltage_now (uV); on mains when a Mains supply is online or the battery is not discharging."""
    batteries, mains = [], False
    for supply in sorted(_listdir(root)):
        kind = _read(supply / "type")
        if kind == "Mains" and _read(supply / "online") == "1":
            mains = True
        elif kind == "Battery" or (kind is None and supply.name.startswith("BAT")):
            batteries.append(supply)
    if not batteries:
        raise SensorUnavailable(f"no battery under {root}")
    bat = batteries[0]
    try:
        if (bat / "energy_now").exists():
            now_uwh = _number(bat / "energy_now")
            full_uwh = _number(bat / "energy_full")
        elif (bat / "charge_now").exists():
            volts = _number(bat / "voltage_now") / 1e6
            now_uwh = _number(bat / "charge_now") * volts
            full_uwh = _number(bat / "charge_full") * volts
        else:
            raise SensorUnavailable(f"{bat} has neither energy_now nor charge_now")
        percent = _number(bat / "capacity") if (bat / "capacity").exists() else 100 * now_uwh / full_uwh
    except PermissionError as exc:
        raise SensorUnavailable(f"no permission to read {exc.filename}") from None
    except (OSError, ValueError, ZeroDivisionError) as exc:
        raise SensorUnavailable(f"cannot read {bat}: {exc}") from None
    status = _read(bat / "status") or "Unknown"
    mains = mains or status in ("Charging", "Full", "Not charging")
    return BatteryReading(now_uwh * 3600 / 1e6, float(percent), mains, f"{bat.name} ({status})")


def parse_ioreg(plist: bytes) -> BatteryReading:
    """macOS `ioreg -rn AppleSmartBattery -a`: raw capacity (mAh) x voltage (mV)."""
    try:
        entries = plistlib.loads(plist)
        bat = entries[0] if isinstance(entries, list) else entries
        mah = bat.get("AppleRawCurrentCapacity", bat.get("CurrentCapacity"))
        max_mah = bat.get("AppleRawMaxCapacity", bat.get("MaxCapacity"))
        mwh = float(mah) * float(bat["Voltage"]) / 1000
        percent = 100 * float(mah) / float(max_mah)
    except (plistlib.InvalidFileException, IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise SensorUnavailable(f"cannot read the battery from ioreg: {exc!r}") from None
    on_mains = bool(bat.get("ExternalConnected")) or bool(bat.get("IsCharging"))
    return BatteryReading(mwh * 3.6, percent, on_mains, "AppleSmartBattery")


def read_macos_battery() -> BatteryReading:
    try:
        out = subprocess.run(["ioreg", "-rn", "AppleSmartBattery", "-a"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SensorUnavailable(f"ioreg failed: {exc}") from None
    if not out.stdout.strip():
        raise SensorUnavailable("no battery (ioreg lists no AppleSmartBattery)")
    return parse_ioreg(out.stdout)


class BatterySensor(Sensor):
    """What the battery gave up since the sensor opened. Coarse (the reading moves every few
    seconds) and whole-machine: the benchmark reads it between blocks of answers of one mode."""

    source = "battery"
    per_answer = False

    def __init__(self, read: Callable[[], BatteryReading], allow_mains: bool = False) -> None:
        self.read = read
        first = read()
        if first.on_mains and not allow_mains:
            raise OnMainsPower(
                f"battery {first.name} is on mains power, so its discharge would not measure this run: "
                "unplug the charger, or pass --allow-ac to run anyway (energy is then not reported)"
            )
        self.on_mains = first.on_mains
        self.start = first
        self.detail = f"battery discharge: {first.name}"

    def joules(self) -> float:
        return self.start.energy_j - self.read().energy_j

    def percent(self) -> float:
        return self.read().percent


def battery_reader(power_supply: Path = POWER_SUPPLY) -> Callable[[], BatteryReading]:
    if sys.platform == "darwin":
        return read_macos_battery
    return lambda: read_sysfs_battery(power_supply)


def open_sensor(
    kind: str, *, allow_mains: bool = False, powercap: Path = POWERCAP, power_supply: Path = POWER_SUPPLY
) -> tuple[Sensor | None, str | None]:
    """(sensor, None), or (None, why not). `auto` tries Apple Silicon, then RAPL, then a discharging
    battery; a sensor named explicitly that cannot be read raises SensorUnavailable, and a battery
    on mains power raises OnMainsPower unless `allow_mains`."""
    if kind not in KINDS:
        raise ValueError(f"energy must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return None, "not measured (--energy none)"
    openers: dict[str, Callable[[], Sensor]] = {
        "apple": AppleSensor,
        "rapl": lambda: RaplSensor(powercap),
        "battery": lambda: BatterySensor(battery_reader(power_supply), allow_mains),
    }
    if kind != "auto":
        return openers[kind](), None
    reasons = []
    for name in ("apple", "rapl", "battery"):
        if name == "apple" and sys.platform != "darwin":
            continue
        try:
            return openers[name](), None
        except SensorUnavailable as exc:
            reasons.append(f"{name}: {exc}")
        except OnMainsPower:
            reasons.append("battery: on mains power")
    return None, "; ".join(reasons)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(path: Path) -> float:
    return float(path.read_text().strip())
