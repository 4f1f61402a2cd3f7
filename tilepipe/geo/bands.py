"""Band names as archives spell them: ``red``, ``B4_red``, ``B04``, ``SR_B4``, resolved to common names.

A band resolves to an input name when its description (or STAC band name) equals it, when one of
its ``_``/``-``/space separated parts is a common name (``B4_red``, ``red_B4``), or when it is a
known band code of the scene's sensor (the table below; docs/catalogs.md prints it). Where the same
code means different bands on different sensors (Landsat 7 ``B3`` is red, Landsat 8 ``B3`` is
green) and no metadata names the sensor, the band keeps its raw name and asking for a common name
it may hold is an error that says which mapping to give: never a silent guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from tilepipe.errors import bad_file

# STAC eo common names (1.0 and 1.1), lower case.
COMMON_NAMES = frozenset(
    "coastal blue green red yellow pan rededge rededge071 rededge075 rededge078 nir nir08 nir09 "
    "cirrus swir16 swir22 lwir lwir11 lwir12".split()
)

_TM = {1: "blue", 2: "green", 3: "red", 4: "nir", 5: "swir16", 6: "lwir", 7: "swir22"}
SENSOR_BANDS: dict[str, dict[str, str]] = {
    "landsat-tm": {f"{n}": name for n, name in _TM.items()},  # Landsat 4-5 TM
    "landsat-etm": {**{f"{n}": name for n, name in _TM.items()}, "8": "pan"},  # Landsat 7 ETM+
    "landsat-oli": {  # Landsat 8-9 OLI/TIRS
        "1": "coastal", "2": "blue", "3": "green", "4": "red", "5": "nir", "6": "swir16", "7": "swir22",
        "8": "pan", "9": "cirrus", "10": "lwir11", "11": "lwir12",
    },
    "sentinel-2": {  # Sentinel-2 MSI
        "1": "coastal", "2": "blue", "3": "green", "4": "red", "5": "rededge071", "6": "rededge075",
        "7": "rededge078", "8": "nir", "8a": "nir08", "9": "nir09", "10": "cirrus", "11": "swir16",
        "12": "swir22",
    },
}  # fmt: skip
SENSOR_TITLES = {
    "landsat-tm": "Landsat 4-5 TM",
    "landsat-etm": "Landsat 7 ETM+",
    "landsat-oli": "Landsat 8-9 OLI/TIRS",
    "sentinel-2": "Sentinel-2 MSI",
}

_CODE = re.compile(r"(?:(?P<product>sr|st|toa)_)?b(?P<pad>0?)(?P<number>\d{1,2}|8a)")
_PLATFORM = [  # (pattern on platform / instrument / spacecraft text, sensor)
    (re.compile(r"landsat[-_ ]?0?[45]\b|^tm$"), "landsat-tm"),
    (re.compile(r"landsat[-_ ]?0?7\b|etm"), "landsat-etm"),
    (re.compile(r"landsat[-_ ]?0?[89]\b|\boli"), "landsat-oli"),
    (re.compile(r"sentinel[-_ ]?2|\bs2[abc]?\b|^msi$"), "sentinel-2"),
]
SENSOR_TAGS = ("platform", "spacecraft_id", "spacecraft", "satellite", "mission", "sensor", "sensor_id",
               "instruments", "instrument")  # fmt: skip


def sensor_from(*texts: str | Sequence[str] | None) -> str | None:
    """The sensor named by platform / instrument metadata (``landsat-8``, ``LANDSAT_7``, ``msi``), or None."""
    for text in texts:
        for value in [text] if isinstance(text, str) or text is None else list(text):
            value = (value or "").strip().lower()
            for pattern, sensor in _PLATFORM:
                if value and pattern.search(value):
                    return sensor
    return None


def file_sensor(src) -> str | None:
    """The sensor a raster's own metadata names (dataset tags such as SPACECRAFT_ID), or None."""
    tags = {k.lower(): v for k, v in src.tags().items()}
    return sensor_from(*(tags.get(key) for key in SENSOR_TAGS))


def _code(label: str) -> tuple[str, str, bool] | None:
    """(band number, product prefix, zero-padded) of a band code such as B4, B04, SR_B4, B8A."""
    match = _CODE.fullmatch(label)
    if not match:
        return None
    number = match["number"].lstrip("0") or "0"
    return number, match["product"] or "", bool(match["pad"])


def _guess_sensor(labels: Sequence[str]) -> str | None:
    """The sensor the spellings alone tell: Sentinel-2 for B01-B09 (zero-padded), B8A or B12; else None.

    Nothing else is guessed: B9-B11 are Landsat 8-9 thermal bands but also Sentinel-2 bands.
    """
    codes = [c for c in (_code(label) for label in labels) if c]
    if any(number in ("8a", "12") or (padded and not product) for number, product, padded in codes):
        return "sentinel-2"
    return None


def interpret(labels: Sequence[str | None], sensor: str | None) -> tuple[dict[str, int], list[str]]:
    """Name -> 1-based band index from band labels, and the labels whose meaning depends on the sensor.

    Labels are lower-cased; the first band to claim a name keeps it.
    """
    cleaned = [(label or "").strip().lower() for label in labels]
    sensor = sensor or _guess_sensor(cleaned)
    names: dict[str, int] = {}
    ambiguous: list[str] = []
    for index, label in enumerate(cleaned, start=1):
        if not label:
            continue
        parts = [p for p in re.split(r"[_\- ]+", label) if p in COMMON_NAMES]
        code = _code(label)
        if label in COMMON_NAMES or len(set(parts)) == 1:
            name = label if label in COMMON_NAMES else parts[0]
        elif code and sensor:
            name = SENSOR_BANDS[sensor].get(code[0], label)
        elif code:
            name = label
            ambiguous.append(label)
        else:
            name = label
        names.setdefault(name, index)
        names.setdefault(label, index)  # the raw spelling finds the band too (bands mapping, bands.input)
    return names, ambiguous


def parse_band_mapping(text: str | None, path: Path | str) -> dict[str, int | str]:
    """Parse a catalog band mapping: ``red=3;green=2;blue=1`` or ``red=B4_red;green=B3_green``."""
    if not text or not str(text).strip():
        return {}
    mapping: dict[str, int | str] = {}
    for part in str(text).split(";"):
        name, sep, band = part.partition("=")
        name, band = name.strip().lower(), band.strip()
        if not sep or not band or not name:
            raise bad_file(path, f"bad band mapping {text!r}: expected e.g. red=3;green=2;blue=1 or red=B4")
        mapping[name] = int(band) if band.isdigit() else band
    return mapping


def _band_labels(src, labels: Sequence[str | None] | None) -> list[str | None]:
    """The labels to read names from: the catalog's (STAC bands) when it gives them, else descriptions."""
    if labels is not None and len(labels) != src.count:
        raise bad_file(src.name, f"the catalog describes {len(labels)} band(s) but the file has {src.count}")
    return list(labels) if labels is not None else list(src.descriptions)


def _found(src, labels: Sequence[str | None] | None, sensor: str | None) -> tuple[dict[str, int], list[str]]:
    return interpret(_band_labels(src, labels), sensor or file_sensor(src))


def _mapped(src, mapping: dict[str, int | str], found: dict[str, int]) -> dict[str, int]:
    """The catalog mapping with band names turned into indexes (checked against the file)."""
    resolved: dict[str, int] = {}
    for name, band in mapping.items():
        if isinstance(band, int):
            if not 1 <= band <= src.count:
                raise bad_file(src.name, f"band mapping {name}={band} but file has {src.count} band(s)")
            resolved[name] = band
        elif band.lower() in found:
            resolved[name] = found[band.lower()]
        else:
            has = ", ".join(found) or "no band names"
            raise bad_file(src.name, f"band mapping {name}={band} but no band is named {band} (has {has})")
    return resolved


def band_names(
    src, mapping: dict[str, int | str], labels: Sequence[str | None] | None = None, sensor: str | None = None
) -> dict[str, int]:
    """Name -> 1-based band index, one name per band.

    The catalog mapping when given, else each band's common name (its own spelling where none resolves).
    """
    found, _ = _found(src, labels, sensor)
    if mapping:
        return _mapped(src, mapping, found)
    best: dict[int, str] = {}
    for name, index in found.items():
        if index not in best or (name in COMMON_NAMES and best[index] not in COMMON_NAMES):
            best[index] = name
    return {name: index for index, name in sorted(best.items())}


def resolve_bands(
    src,
    mapping: dict[str, int | str],
    wanted: list[str],
    labels: Sequence[str | None] | None = None,
    sensor: str | None = None,
) -> list[int]:
    """Band indexes for the wanted names, or one line saying which band is missing and what to give."""
    found, ambiguous = _found(src, labels, sensor)
    names = _mapped(src, mapping, found) if mapping else found
    if not names:
        raise bad_file(
            src.name,
            "bands carry no names (no band descriptions) and the catalog gives no `bands` mapping, "
            "e.g. red=3;green=2;blue=1",
        )
    missing = [w for w in wanted if w not in names]
    if not missing:
        return [names[w] for w in wanted]
    if ambiguous and not mapping:
        example = ";".join(f"{w}={_oli_code(w)}" for w in missing)
        raise bad_file(
            src.name,
            f"band names {', '.join(b.upper() for b in ambiguous)} mean different bands on Landsat 4-7 and "
            f"Landsat 8-9 (B3 is red on Landsat 7, green on Landsat 8) and nothing names the sensor: give a "
            f"bands mapping (Landsat 8-9: {example}) or the sensor (STAC platform, or a SPACECRAFT_ID tag)",
        )
    shown = band_names(src, mapping, labels, sensor)
    raise bad_file(src.name, f"lacks band(s) {', '.join(missing)} (has {', '.join(shown)})")


def _oli_code(name: str) -> str:
    """The Landsat 8-9 band code of a common name, for an example mapping (``?`` when it has none)."""
    codes = {v: k for k, v in SENSOR_BANDS["landsat-oli"].items()}
    return f"B{codes[name]}" if name in codes else "?"


def spelling_table() -> str:
    """The band-code table as Markdown (docs/catalogs.md shows it; a test keeps the two in step)."""
    numbers = sorted({n for table in SENSOR_BANDS.values() for n in table}, key=lambda n: (len(n), n))
    header = "| band | " + " | ".join(SENSOR_TITLES[s] for s in SENSOR_BANDS) + " |"
    rows = [header, "|---" * (len(SENSOR_BANDS) + 1) + "|"]
    for number in numbers:
        cells = [SENSOR_BANDS[s].get(number, "") for s in SENSOR_BANDS]
        rows.append(f"| B{number.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
