"""PromQL helpers for the dashboard and alert tests.

* :func:`metric_names` lists the metric names a PromQL expression selects (a light lexer, not
  a parser: strings, label matchers, ranges and grouping clauses are removed first).
* :func:`check_expressions` proves expressions parse by writing them as recording rules into a
  temporary rules file and running the real ``promtool check rules``.
* :func:`from_grafana` turns a Grafana query (``$__rate_interval``, ``$namespace``,
  ``label_values(...)``) into plain PromQL.
* :func:`is_exported` says whether a selected name is an exported metric, allowing the
  ``_bucket``/``_sum``/``_count`` series of histograms and summaries.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

# Words that look like identifiers in PromQL but are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "atan2", "start", "end",
}  # fmt: skip
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
GRAFANA_MACROS = {
    "$__rate_interval": "5m",
    "${__rate_interval}": "5m",
    "$__interval": "1m",
    "${__interval}": "1m",
    "$__range": "1h",
    "${__range}": "1h",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]+)"')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
_AT = re.compile(r"@\s*(start\(\)|end\(\)|[0-9.]+)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*(?:,\s*(\w+)\s*)?\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by ``expr``, e.g. ``rate(a_total{x="y"}[5m]) / b`` -> {a_total, b}."""
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)  # first, so a `}` or `]` inside a string cannot confuse the rest
    text = _BRACES.sub(" ", text)  # label matchers
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _AT.sub(" ", text)
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def from_grafana(query: str) -> str:
    """Plain PromQL for a Grafana Prometheus query: macros become durations, dashboard
    variables become ``.*`` (they stand in regex matchers), ``label_values(m, l)`` becomes ``m``."""
    for macro, value in GRAFANA_MACROS.items():
        query = query.replace(macro, value)
    query = _VARIABLE.sub(".*", query)
    label_values = _LABEL_VALUES.match(query)
    if label_values:
        query = label_values.group(1)
    return query


def is_exported(name: str, exported: Iterable[str]) -> bool:
    """True when ``name`` is in ``exported`` or is a histogram/summary series of one."""
    exported = set(exported)
    if name in exported:
        return True
    return any(name.endswith(suffix) and name[: -len(suffix)] in exported for suffix in HISTOGRAM_SUFFIXES)


def promtool_path() -> str:
    """The real promtool (Debian's prometheus package; `make setup` installs it)."""
    path = shutil.which("promtool")
    if path is None:
        raise RuntimeError("promtool not found: run scripts/system-deps (Debian package prometheus)")
    return path


def check_expressions(expressions: Mapping[str, str]) -> tuple[bool, str]:
    """Run ``promtool check rules`` on ``expressions`` (name -> PromQL), one recording rule per
    group named after its key, so an error names the expression. Returns (ok, promtool output)."""
    groups = [
        {"name": name, "rules": [{"record": f"isplit_check:expr_{index}", "expr": expr}]}
        for index, (name, expr) in enumerate(expressions.items())
    ]
    with tempfile.TemporaryDirectory(prefix="promql-check-") as tmp:
        path = Path(tmp) / "expressions.rules.yaml"
        path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        return run_promtool("check", "rules", str(path))


def run_promtool(*args: str, cwd: Path | None = None) -> tuple[bool, str]:
    """Run promtool with ``args``; (exit status 0, stdout + stderr)."""
    result = subprocess.run([promtool_path(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    return result.returncode == 0, result.stdout + result.stderr
