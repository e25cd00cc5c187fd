"""The spec of ``zps experiment``: a TOML (or YAML) file read into a :class:`Spec`, its matrix expanded into
:class:`Run` s, each with a stable id and its ``zps run`` command.

    script = "examples/digits.py"      # default
    args = ["--epochs", "20"]          # passed to the script
    servers = 2
    workers = 2
    target_accuracy = 0.95             # for the time to target accuracy
    out = "results/compression"        # default: <spec's name>.out in the current directory
    timeout = 600                      # seconds per run (default: none)
    extra = ["--compress-min", "256"]  # more zps run flags, the same for every run
    [matrix]                           # every combination is one run; a plain value is a one-value list
    codec = ["", "topk:ratio=0.01"]    # "" is none
    error_feedback = [true]
    seed = [0, 1, 2]                   # given to the script as --seed N
    # an axis of tables: each value sets several settings together (a name of your choice)
    compression = [{codec = ""}, {codec = "topk:ratio=0.01", error_feedback = true, pull_codec = "int8"}]

A matrix key is ``seed`` or any :class:`JobConfig` field with a flag (``codec``, ``pull_codec``,
``error_feedback``, ``mode``, ``staleness``, ``net``, ``straggler``, ``jitter``, ``optimizer``...; ``servers`` and
``workers`` too). Combinations that mean the same run collapse into one: error feedback without a push codec, a
staleness outside ssp. ``script`` is relative to the spec file's folder (a spec runs the same from any directory);
``out`` is relative to the current directory. A value of the wrong type is refused in one line naming its key.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from zps.protocol.config import ConfigError, JobConfig, flag_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_SCRIPT = "examples/digits.py"
SEED = "seed"
_ALIASES = {"servers": "num_servers", "workers": "num_workers"}
_TOP_LEVEL = {"script", "args", "servers", "workers", "matrix", "target_accuracy", "out", "timeout", "extra"}
_FIELDS = {f.name: f for f in fields(JobConfig) if flag_of(f)}
# set by `zps experiment` itself on every run
_RESERVED = {"metrics_out", "progress"}
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


class SpecError(ValueError):
    """The spec is malformed or names a setting zps does not have; the message says which."""


@dataclass(frozen=True)
class Spec:
    """A parsed spec: what every run shares, and the matrix (axis -> values, in the file's order)."""

    script: str
    args: tuple[str, ...]
    matrix: dict[str, list[Any]]
    target_accuracy: float | None
    out: Path
    timeout: float | None
    extra: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One configuration: the JobConfig settings that differ from the defaults, and the seed (None: no seed
    axis). ``run_id`` is stable: the same configuration gets the same id in every sweep."""

    settings: tuple[tuple[str, Any], ...]
    seed: int | None
    script: str
    args: tuple[str, ...]
    extra: tuple[str, ...]

    @property
    def config(self) -> dict[str, Any]:
        """Every setting of this run by field name (defaults included: the columns of the results)."""
        out = {f.name: f.default for f in _FIELDS.values()}
        out.update(self.settings)
        return out

    @property
    def group(self) -> tuple[tuple[str, Any], ...]:
        """What the runs of one configuration over seeds share."""
        return self.settings

    @property
    def run_id(self) -> str:
        canonical = json.dumps({"settings": dict(self.settings), "seed": self.seed, "script": self.script,
                                "args": list(self.args), "extra": list(self.extra)}, sort_keys=True)
        return f"{self.slug}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"

    @property
    def slug(self) -> str:
        """A readable name: codec (+ef), pull codec, mode, shaping, size and seed."""
        c = self.config
        parts = [(c["codec"].split(":")[0] or "none") + ("+ef" if c["error_feedback"] else "")]
        if c["pull_codec"]:
            parts.append("pull-" + c["pull_codec"].split(":")[0])
        parts.append(c["mode"] + (str(c["staleness"]) if c["mode"] == "ssp" else ""))
        parts += [name for name in ("net", "straggler", "jitter") if c[name]]
        parts.append(f"s{c['num_servers']}w{c['num_workers']}")
        if self.seed is not None:
            parts.append(f"seed{self.seed}")
        return re.sub(r"[^A-Za-z0-9+.]+", "-", "-".join(parts))[:60]

    def script_args(self) -> list[str]:
        return [*self.args, *(["--seed", str(self.seed)] if self.seed is not None else [])]

    def command(self, metrics_out: Path, python: str = sys.executable) -> list[str]:
        """The ``zps run`` argv of this run (the spec's ``extra`` before the flags it must not override)."""
        flags: list[str] = []
        for name, value in self.settings:
            flag = flag_of(_FIELDS[name])
            assert flag is not None
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            else:
                flags += [flag, str(value)]
        return [python, "-m", "zps.launcher.cli", "run", *flags, *self.extra, "--metrics-out", str(metrics_out),
                "--progress", "off", self.script, *self.script_args()]


def load_spec(path: str | Path, out: str | Path | None = None) -> Spec:
    """Read a spec file (``.toml``, or ``.yaml``/``.yml`` with PyYAML installed); ``out`` overrides its ``out``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except ImportError:
        raise SpecError(f"{path}: a YAML spec needs PyYAML (pip install pyyaml); TOML needs nothing") from None
    except Exception as exc:  # the parsers' own errors, with line and column
        raise SpecError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a table of settings at the top")
    spec = parse_spec(data, default_out=Path(f"{path.stem}.out"), base=path.parent)
    return spec if out is None else replace(spec, out=Path(out))


def _typed(value: Any, name: str, what: str) -> Any:
    """``value`` when it has the type of setting ``name`` (an int is a number too); else SpecError naming ``what``."""
    kind = str(_FIELDS[name].type)
    ok = {"int": isinstance(value, int), "float": isinstance(value, (int, float)), "bool": isinstance(value, bool),
          "str": isinstance(value, str)}.get(kind, True)
    if not ok or (kind != "bool" and isinstance(value, bool)):
        raise SpecError(f"{what}: expected {_KINDS.get(kind, kind)}, got {value!r}")
    return value


def resolve_script(script: str, base: Path) -> str:
    """``script`` relative to ``base`` (the spec's folder), as a path from the current directory where it lies under
    it (the run ids and commands stay short and the same on every machine), absolute otherwise."""
    path = Path(os.path.abspath(base / script))
    try:
        return str(path.relative_to(os.path.abspath(os.getcwd())))
    except ValueError:
        return str(path)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise SpecError(f"{what}: expected a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise SpecError(f"{what}: expected a number > 0, got {value!r}")
    return float(value)


def parse_spec(data: Mapping[str, Any], default_out: str | Path = "experiment.out", base: Path | None = None) -> Spec:
    """A :class:`Spec` from the file's parsed table; every matrix value is checked against its setting. ``base``:
    the folder ``script`` is relative to (the spec file's; None: the current directory)."""
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise SpecError(f"unknown top-level key(s) {', '.join(sorted(unknown))}; "
                        f"expected {', '.join(sorted(_TOP_LEVEL))}")
    matrix_in = data.get("matrix", {})
    if not isinstance(matrix_in, dict):
        raise SpecError("[matrix]: expected a table of lists")
    matrix: dict[str, list[Any]] = {}
    for key in ("servers", "workers"):
        if key in data:
            if key in matrix_in:
                raise SpecError(f"{key!r} is given both at the top and in [matrix]")
            matrix[_ALIASES[key]] = [_typed(data[key], _ALIASES[key], key)]
    for key, values in matrix_in.items():
        name = _ALIASES.get(key, key)
        if isinstance(values, list) and any(isinstance(v, dict) for v in values):
            matrix[key] = [_bundle(key, i, bundle) for i, bundle in enumerate(values, 1)]
            continue
        if name != SEED and (name not in _FIELDS or name in _RESERVED):
            allowed = sorted({SEED, *_ALIASES, *_FIELDS} - _RESERVED - set(_ALIASES.values()))
            raise SpecError(f"[matrix] {key!r} is not a setting of zps run; expected one of {', '.join(allowed)}")
        if isinstance(values, dict):
            raise SpecError(f"[matrix] {key}: expected a value or a list of values, got a table {values!r}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpecError(f"[matrix] {key}: an empty list makes no runs")
        if name != SEED:
            values = [_typed(v, name, f"[matrix] {key}") for v in values]
        matrix[name] = values
    for value in matrix.get(SEED, []):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"[matrix] seed: expected integers, got {value!r}")
    target = data.get("target_accuracy")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not 0 < target <= 1):
        raise SpecError(f"target_accuracy: expected a fraction in (0, 1], got {target!r}")
    script = data.get("script", DEFAULT_SCRIPT)
    if not isinstance(script, str) or not script:
        raise SpecError(f"script: expected a path, got {script!r}")
    if "script" in data and base is not None:
        script = resolve_script(script, base)
    out = data.get("out", default_out)
    if not isinstance(out, (str, Path)) or not str(out):
        raise SpecError(f"out: expected a folder's path (a string), got {out!r}")
    spec = Spec(script=script, args=_strings(data.get("args", []), "args"), matrix=matrix,
                target_accuracy=None if target is None else float(target), out=Path(out),
                timeout=_number(data.get("timeout"), "timeout"), extra=_strings(data.get("extra", []), "extra"))
    expand(spec)  # every combination checked now, before anything runs
    return spec


def _bundle(key: str, index: int, bundle: Any) -> dict[str, Any]:
    """One value of a grouped axis (a table of settings that go together), its settings checked."""
    if not isinstance(bundle, dict):
        raise SpecError(f"[matrix] {key}: a grouped axis is a list of tables of settings; value {index} is "
                        f"{bundle!r}")
    out = {}
    for setting, value in bundle.items():
        name = _ALIASES.get(setting, setting)
        if name not in _FIELDS or name in _RESERVED:
            raise SpecError(f"[matrix] {key}: {setting!r} is not a setting of zps run")
        out[name] = _typed(value, name, f"[matrix] {key}: {setting}")
    return out


def _settings(combo: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The combination as JobConfig settings that differ from the defaults; ConfigError when one is bad."""
    values = dict(combo)
    if not values.get("codec"):
        values["error_feedback"] = False  # nothing to feed back into
    if values.get("mode", _FIELDS["mode"].default) != "ssp":
        values["staleness"] = 0
    JobConfig(**values)  # the same checks as zps run's (a spec's syntax: net, straggler, jitter...)
    return tuple((name, values[name]) for name in _FIELDS if name in values
                 and values[name] != _FIELDS[name].default)


def expand(spec: Spec) -> list[Run]:
    """Every configuration of the matrix, seeds outermost (a stopped sweep has whole seeds done), in the file's
    order otherwise; the same run twice (after collapsing) once."""
    seeds: list[int | None] = list(spec.matrix.get(SEED, [None]))
    axes = [name for name in spec.matrix if name != SEED]
    runs: dict[str, Run] = {}
    for seed in seeds:
        for values in itertools.product(*(spec.matrix[name] for name in axes)):
            combo: dict[str, Any] = {}
            for name, value in zip(axes, values, strict=True):
                combo.update(value if isinstance(value, dict) else {name: value})  # a bundle sets several
            try:
                settings = _settings(combo)
            except (ConfigError, TypeError) as exc:
                raise SpecError(f"the combination {combo}: {exc}") from None
            run = Run(settings, seed, spec.script, spec.args, spec.extra)
            runs.setdefault(run.run_id, run)
    return list(runs.values())


def varying(runs: Sequence[Run]) -> list[str]:
    """The settings that differ between ``runs`` (seed aside), in JobConfig's order: a table's key columns."""
    configs = [r.config for r in runs]
    return [name for name in _FIELDS if len({json.dumps(c[name]) for c in configs}) > 1]


def check_specs(runs: Sequence[Run]) -> None:
    """Build every codec and optimizer spec of ``runs`` once (imports torch): SpecError names a bad one."""
    seen: set[tuple[tuple[str, Any], ...]] = set()
    for run in runs:
        specs = tuple((k, v) for k, v in run.settings if k in ("codec", "pull_codec", "optimizer"))
        if specs in seen:
            continue
        seen.add(specs)
        try:
            JobConfig(**dict(specs)).check_specs()
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
