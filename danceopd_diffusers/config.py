"""The fields-and-routes declaration (``--fields_config``) and its static checks.

Everything here runs before any model weights load, so a typo costs seconds, not a model download.
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

FIELD_TYPES = ("base", "lora", "checkpoint", "cfg", "guider", "image_guidance", "mix")
OPERATOR_TYPES = ("cfg", "guider", "image_guidance", "mix")
EDIT_ONLY_TYPES = ("image_guidance",)


class ConfigError(ValueError):
    """A problem in the user's fields config or flags, with the fix in its message."""


#: the largest fields config read (real ones are a few KB): a huge file is a mistake, or an attack on memory
MAX_CONFIG_BYTES = 1 << 20
#: YAML aliases (``*name``) in one config: a few reuse an anchor, more is an alias ("billion laughs") bomb
MAX_YAML_ALIASES = 64
#: values in a config once every alias is expanded, and how deep they nest
MAX_CONFIG_VALUES = 20_000
MAX_CONFIG_DEPTH = 32
#: declared fields, and how many fields deep one is built on others (``of``): bounds every walk of the graph
MAX_FIELDS = 256
MAX_FIELD_DEPTH = 16
#: transformer evaluations one query of a field may take (each path from it to a model field is one): a mix
#: of a few operators takes a handful; a lattice of mixes sharing inputs takes exponentially many
MAX_FIELD_CALLS = 64


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a regular file (``"it is a FIFO (named pipe)"``, ...), or None, from ``os.stat``
    alone: opening a FIFO blocks until a writer comes, a device can be endless, so nothing is opened here."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "it does not exist"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return f"it is {_file_kind(mode)}, not a regular file"


def check_regular_file(path: str | os.PathLike, what: str, fix: str = "Pass a regular file.") -> None:
    """A :class:`ConfigError` naming ``what`` when ``path`` is missing or not a regular file (see above)."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise ConfigError(f"{what} {path}: {problem}. {fix}")


def open_regular_file(path: str | os.PathLike, what: str, fix: str = "Pass a regular file.") -> BinaryIO:
    """``open(path, "rb")`` that never blocks or reads a device: opened non-blocking, then refused unless the
    open descriptor is a regular file (so a path swapped between a check and the open is caught too)."""
    check_regular_file(path, what, fix)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be opened ({exc.strerror or exc}). {fix}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfigError(f"{what} {path}: it is {_file_kind(mode)}, not a regular file. {fix}")
    return os.fdopen(fd, "rb")


def hub_offline() -> bool:
    """Whether huggingface_hub may not reach the network (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def looks_like_hub_id(name: str, owner_required: bool = True) -> bool:
    """Whether a path that does not exist locally could be a Hub repo id (``owner/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        return False
    if owner_required and name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def offline_error(what: str, name: str) -> ConfigError:
    """The error for a Hub id that is neither a local path nor in the cache while offline."""
    return ConfigError(
        f"{what} {name!r} is not a local path and is not in the Hub cache, and huggingface_hub is offline "
        "(HF_HUB_OFFLINE is set, no network): set HF_HUB_OFFLINE=0 to download it, or pass a local path."
    )


@dataclass
class FieldSpec:
    name: str
    type: str
    path: str | None = None  # lora / checkpoint: local path or Hub id
    weight_name: str | None = None  # lora: file inside a folder or repo
    subfolder: str | None = None  # checkpoint: e.g. "transformer" of a pipeline repo
    of: str | list[str] | None = (
        None  # operators: the field they are built on (mix: a list); lora: a checkpoint
    )
    scale: float | None = None  # cfg: guidance scale
    norm_rescale: bool = False  # cfg: rescale to the conditional's norm (Qwen-Image's true CFG)
    embedded_guidance: float | None = (
        None  # base/lora/checkpoint of guidance-distilled models (Flux): its input
    )
    guider: str | None = None  # guider: class name in diffusers.guiders
    guider_kwargs: dict[str, Any] = field(default_factory=dict)
    text_scale: float | None = None  # image_guidance: scale of the instruction
    image_scale: float | None = None  # image_guidance: scale of the source image
    weights: list[float] | None = None  # mix: one weight per field of `of` (default equal)

    def inputs(self) -> list[str]:
        """The names of the fields this one is built on (a mix has several)."""
        if self.of is None:
            return []
        return list(self.of) if isinstance(self.of, list) else [self.of]


@dataclass
class RouteSpec:
    field: str
    task: str = "t2i"
    weight: float = 1.0


@dataclass
class FieldsConfig:
    fields: dict[str, FieldSpec]
    routes: list[RouteSpec]

    def to_dict(self) -> dict:
        def clean(spec: FieldSpec) -> dict:
            d = {k: v for k, v in spec.__dict__.items() if v not in (None, {}, False) and k != "name"}
            return d

        return {
            "fields": {name: clean(s) for name, s in self.fields.items()},
            "routes": [r.__dict__.copy() for r in self.routes],
        }

    def resolve_chain(self, name: str) -> list[FieldSpec]:
        """The field and the fields it is built on, each once, outermost first (depth first through a mix's
        fields). Iterative and memoized: a field shared by several inputs is listed, and walked, once."""
        chain: list[FieldSpec] = []
        seen: set[str] = set()
        stack = [name]
        while stack:
            current = stack.pop()
            if current in seen or current not in self.fields:
                continue
            seen.add(current)
            chain.append(self.fields[current])
            stack.extend(reversed(self.fields[current].inputs()))
        return chain

    def transformer_field(self, name: str) -> FieldSpec:
        return self.resolve_chain(name)[-1]

    def absorbed_guidance_scale(self) -> float | None:
        """The largest guidance scale a routed field applies (a cfg field's ``scale``, a guider's
        ``guidance_scale``): what the student absorbs, recorded in the exported pipeline and its card so that
        nobody adds it again at inference. None when no routed field guides."""
        scales = set()
        for route in self.routes:
            for spec in self.resolve_chain(route.field):
                if spec.type == "cfg":
                    scales.add(spec.scale)
                elif spec.type == "guider" and "guidance_scale" in spec.guider_kwargs:
                    scales.add(float(spec.guider_kwargs["guidance_scale"]))
        return max(scales) if scales else None

    def routed_fields(self) -> list[str]:
        seen: list[str] = []
        for route in self.routes:
            if route.field not in seen:
                seen.append(route.field)
        return seen


#: the type each field key must have in the config file
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "type": (str,),
    "path": (str,),
    "weight_name": (str,),
    "subfolder": (str,),
    "of": (str, list),
    "guider": (str,),
    "scale": (int, float),
    "text_scale": (int, float),
    "image_scale": (int, float),
    "embedded_guidance": (int, float),
    "norm_rescale": (bool,),
    "guider_kwargs": (dict,),
    "weights": (list,),
}
_NUMBER_KEYS = ("scale", "text_scale", "image_scale", "embedded_guidance")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages stay one readable line whatever the input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _check_type(where: str, key: str, value: Any, types: tuple[type, ...]) -> None:
    is_bool = isinstance(value, bool)
    if not isinstance(value, types) or (is_bool and bool not in types):
        kind = "a number" if float in types else ("true or false" if bool in types else types[0].__name__)
        raise ConfigError(
            f"{where}: `{key}` must be {kind}, not {_short(value)} ({type(value).__name__}). Fix it in the "
            "fields config."
        )


def _check_finite(where: str, key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any float
        finite = False
    if not finite:
        raise ConfigError(
            f"{where}: `{key}` is {_short(value, 40)}; it must be a finite number. Fix it in the fields config."
        )


@functools.cache
def _unique_key_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last), and
    bounds what a small file can expand to: aliases are counted while composing and the composed graph's size
    with every alias expanded is counted once per node (memoized), so an alias bomb fails in milliseconds."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        aliases = 0
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    mark = self.peek_event().start_mark
                    raise ConfigError(
                        f"more than {MAX_YAML_ALIASES} YAML aliases (`*name`, line {mark.line + 1}): a config "
                        "this size never needs them, and many expand exponentially (an alias bomb). Write the "
                        "values out."
                    )
            self.depth += 1
            try:
                if self.depth > MAX_CONFIG_DEPTH:
                    mark = self.peek_event().start_mark
                    raise ConfigError(
                        f"values nest more than {MAX_CONFIG_DEPTH} levels deep (line {mark.line + 1}); a fields "
                        "config needs about 4. Flatten it."
                    )
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may override on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    continue  # SafeLoader reports unhashable keys itself
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(
                        f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); YAML would "
                        "silently keep the last. Rename or remove one."
                    )
                seen[key] = line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _expanded_size(root: Any) -> int:
    """Values in a composed YAML node graph once every alias is expanded; a node is counted once per node
    (memoized), so a graph of a few hundred nodes that expands to billions costs a few hundred steps. A node
    that contains itself (``&a [*a]``) is refused."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else list(node.value)
        )
        if done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_CONFIG_VALUES:
                raise ConfigError(
                    f"it expands to more than {MAX_CONFIG_VALUES} values (through YAML aliases, line "
                    f"{node.start_mark.line + 1}); a fields config has a few dozen. Write the values out."
                )
            continue
        if key in open_nodes:
            raise ConfigError(
                f"a YAML alias makes a value contain itself (line {node.start_mark.line + 1}); remove the alias."
            )
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _load_yaml(text: str) -> Any:
    """``yaml.load`` with the bounded loader: the node graph is composed and sized before any value is built."""
    loader = _unique_key_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_shape(data: Any) -> None:
    """Values nested at most ``MAX_CONFIG_DEPTH`` deep and at most ``MAX_CONFIG_VALUES`` of them (a JSON file,
    or a mapping built in Python), walked iteratively so that no depth can overflow the stack."""
    count, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"values nest more than {MAX_CONFIG_DEPTH} levels deep; a fields config needs about 4. Flatten it."
            )
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"it holds more than {MAX_CONFIG_VALUES} values; a fields config has a few dozen."
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for pair in value.items() for v in pair)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _unique_json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(
                f"key {key!r} appears twice in one object; JSON would silently keep the last. Rename or remove one."
            )
        out[key] = value
    return out


def _load_file(path: str | Path) -> dict:
    path = Path(path)
    what, fix = "--fields_config", "Pass the path of a .yaml or .json file."
    check_regular_file(path, what, fix)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{what} {path} is {size} bytes; a fields config is a few KB (at most {MAX_CONFIG_BYTES}). "
            "Pass the right file."
        )
    try:
        with open_regular_file(path, what, fix) as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text ({exc}). Pass a .yaml or .json text file."
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc}). Pass a .yaml or .json text file.") from exc
    kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
    try:
        if kind == "YAML":
            data = _load_yaml(text)
        else:
            data = json.loads(text, object_pairs_hook=_unique_json_pairs)
        _check_shape(data)
    except ConfigError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(
            f"{what} {path}: values nest too deep to read; a fields config needs about 4 levels. Flatten it."
        ) from exc
    except Exception as exc:  # the parser's message says where
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{what} {path} is not valid {kind}: {detail}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping with the keys `fields` and `routes`.")
    return data


def parse_fields_config(data: dict | str | Path, base_dir: str | Path | None = None) -> FieldsConfig:
    """Parse and check a config mapping (or a file). Relative local paths are taken from the file's folder."""
    if not isinstance(data, dict):
        base_dir = Path(data).resolve().parent
        data = _load_file(data)
    unknown = set(data) - {"fields", "routes"}
    if unknown:
        raise ConfigError(
            f"Unknown top-level key(s) {sorted(unknown)} in the fields config; use `fields` and `routes`."
        )
    raw_fields = data.get("fields") or {}
    if not isinstance(raw_fields, dict) or not raw_fields:
        raise ConfigError(
            "The fields config declares no fields: add a `fields:` mapping of name -> {type: ...}."
        )
    if len(raw_fields) > MAX_FIELDS:
        raise ConfigError(
            f"The fields config declares {len(raw_fields)} fields; at most {MAX_FIELDS} are supported. Declare "
            "only the fields the routes use."
        )
    fields: dict[str, FieldSpec] = {}
    allowed = set(FieldSpec.__dataclass_fields__) - {"name"}
    for name, raw in raw_fields.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"Field name {_short(name)} ({type(name).__name__}) is not a name: field names are non-empty "
                "text (quote it in YAML, e.g. 'yes' or '1')."
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"Field {name!r} must be a mapping with at least `type`, not {_short(raw)}.")
        extra = set(raw) - allowed
        if extra:
            raise ConfigError(
                f"Field {name!r} has unknown key(s) {_short(sorted(map(str, extra)))}; allowed keys: "
                f"{sorted(allowed)}."
            )
        for key, value in raw.items():
            if value is not None:
                _check_type(f"Field {name!r}", key, value, _KEY_TYPES[key])
        spec = FieldSpec(name=name, **raw)
        if spec.path and base_dir is not None and not Path(spec.path).is_absolute():
            candidate = Path(base_dir) / spec.path
            if candidate.exists():  # otherwise it may be a Hub repo id
                spec.path = str(candidate)
        fields[spec.name] = spec
    raw_routes = data.get("routes")
    if not raw_routes:
        raise ConfigError(
            "The fields config declares no routes: add `routes: [{field: NAME, task: BUCKET}]`."
        )
    if not isinstance(raw_routes, list):
        raise ConfigError(
            f"`routes` must be a list of mappings, e.g. `routes: [{{field: NAME, task: BUCKET}}]`, not "
            f"{_short(raw_routes)}."
        )
    routes = []
    for raw in raw_routes:
        if not isinstance(raw, dict) or "field" not in raw:
            raise ConfigError(
                f"Route {_short(raw)} must be a mapping with `field` (and optionally `task`, `weight`)."
            )
        extra = set(raw) - {"field", "task", "weight"}
        if extra:
            raise ConfigError(
                f"Route {_short(raw)} has unknown key(s) {_short(sorted(map(str, extra)))}; allowed: field, "
                "task, weight."
            )
        for key in ("field", "task"):
            value = raw.get(key, "t2i")
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(
                    f"Route {_short(raw)}: `{key}` must be a non-empty name, not {_short(value)} "
                    f"({type(value).__name__}). Fix it in the fields config (quote names such as 'yes' or '1')."
                )
        where = f"Route to {raw['field']!r}"
        _check_type(where, "weight", raw.get("weight", 1.0), (int, float))
        _check_finite(where, "weight", raw.get("weight", 1.0))
        routes.append(
            RouteSpec(field=raw["field"], task=raw.get("task", "t2i"), weight=float(raw.get("weight", 1.0)))
        )
    config = FieldsConfig(fields=fields, routes=routes)
    check_fields_config(config)
    return config


def check_fields_config(config: FieldsConfig) -> None:
    from diffusers import guiders

    for spec in config.fields.values():
        for key in _NUMBER_KEYS:
            _check_finite(f"Field {spec.name!r}", key, getattr(spec, key))
        for key, value in spec.guider_kwargs.items():
            _check_finite(f"Field {spec.name!r}", f"guider_kwargs.{key}", value)
        if spec.type not in FIELD_TYPES:
            raise ConfigError(
                f"Field {spec.name!r} has unknown type {spec.type!r}; use one of {list(FIELD_TYPES)}."
            )
        if spec.type in ("lora", "checkpoint") and not spec.path:
            raise ConfigError(
                f"Field {spec.name!r} ({spec.type}) needs `path`: a local path or a Hub repo id."
            )
        if spec.type == "mix":
            _check_mix(spec, config)
        elif isinstance(spec.of, list) or spec.weights is not None:
            raise ConfigError(
                f"Field {spec.name!r} ({spec.type}): only a mix field takes a list `of` and `weights`; "
                "give `of` one field name, or make it `type: mix`."
            )
        if spec.type in OPERATOR_TYPES:
            if not spec.of:
                raise ConfigError(
                    f"Field {spec.name!r} ({spec.type}) needs `of`: the name of the field it guides."
                )
            for inner in spec.inputs():
                if inner not in config.fields:
                    raise ConfigError(
                        f"Field {spec.name!r} is built on unknown field {inner!r}; declared fields: {sorted(config.fields)}."
                    )
        elif spec.of and spec.type == "lora":
            _check_lora_on_checkpoint(spec, config)
        elif spec.of:
            raise ConfigError(
                f"Field {spec.name!r} ({spec.type}) cannot have `of`; only operator fields ({', '.join(OPERATOR_TYPES)}) "
                "and a lora on a checkpoint field do."
            )
        if spec.type == "cfg" and (spec.scale is None or spec.scale <= 0):
            raise ConfigError(f"Field {spec.name!r} (cfg) needs a positive `scale`, e.g. `scale: 3.5`.")
        if spec.type == "image_guidance" and (spec.text_scale is None or spec.image_scale is None):
            raise ConfigError(
                f"Field {spec.name!r} (image_guidance) needs `text_scale` and `image_scale`, e.g. 7.5 and 1.5."
            )
        if spec.type == "guider":
            cls = getattr(guiders, spec.guider or "", None)
            known = [n for n in dir(guiders) if n.endswith("Guidance")]
            if cls is None:
                raise ConfigError(
                    f"Field {spec.name!r} names guider {spec.guider!r}, which diffusers.guiders does not have; use one of {known}."
                )
            _check_guider_kwargs(spec, cls)
    check_field_graph(config)
    for route in config.routes:
        if route.field not in config.fields:
            raise ConfigError(
                f"Route to unknown field {route.field!r} (bucket {route.task!r}); declared fields: {sorted(config.fields)}."
                " Fix the route's `field` or declare the field."
            )
        if not route.weight > 0 or not math.isfinite(route.weight):
            raise ConfigError(
                f"Route to {route.field!r} has weight {route.weight}; weights must be > 0 (and finite)."
            )


def check_field_graph(config: FieldsConfig) -> dict[str, int]:
    """Every field's depth (1 for a model, 1 + its deepest input for an operator); refuses a cycle through
    ``of`` and a graph deeper than ``MAX_FIELD_DEPTH``. One iterative depth-first walk, each field visited
    once (memoized), so neither a long chain nor a lattice of mixes can overflow the stack or take exponential
    time."""
    if len(config.fields) > MAX_FIELDS:
        raise ConfigError(
            f"The fields config declares {len(config.fields)} fields; at most {MAX_FIELDS} are supported."
        )
    depth: dict[str, int] = {}
    calls: dict[str, int] = {}
    for start in config.fields:
        if start in depth:
            continue
        path: list[str] = []  # the fields being walked, outermost first
        on_path: set[str] = set()
        stack: list[tuple[str, bool]] = [(start, False)]
        while stack:
            name, done = stack.pop()
            inputs = [n for n in config.fields[name].inputs() if n in config.fields]
            if done:
                path.pop()
                on_path.discard(name)
                depth[name] = 1 + max((depth[n] for n in inputs), default=0)
                calls[name] = sum(calls[n] for n in inputs) or 1
                if depth[name] > MAX_FIELD_DEPTH:
                    raise ConfigError(
                        f"Field {name!r} is built on fields {depth[name]} levels deep (`of`); at most "
                        f"{MAX_FIELD_DEPTH} are supported. Build it on fewer fields."
                    )
                if calls[name] > MAX_FIELD_CALLS:
                    raise ConfigError(
                        f"Field {name!r} reaches its model fields through {calls[name]} paths (`of`, mixes "
                        f"sharing inputs), one model evaluation each per query; at most {MAX_FIELD_CALLS} are "
                        "supported. Mix the model fields directly instead of mixes of mixes."
                    )
                continue
            if name in depth:
                continue
            if name in on_path:
                cycle = path[path.index(name) :]
                raise ConfigError(
                    f"Fields {_short(sorted(set(cycle)))} are built on each other in a cycle; break it."
                )
            path.append(name)
            on_path.add(name)
            stack.append((name, True))
            stack.extend((n, False) for n in inputs if n not in depth)
    return depth


def _check_mix(spec: FieldSpec, config: FieldsConfig) -> None:
    """``{type: mix, of: [a, b], weights: [1, 2]}``: the weighted mean of the named fields (soft routing)."""
    names = spec.of
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"Field {spec.name!r} (mix) needs `of`: a list of field names, e.g. `of: [t2i, local_cfg]`."
        )
    if len(set(names)) != len(names):
        raise ConfigError(
            f"Field {spec.name!r} (mix) names a field twice in `of` {names}; give each once and weight it."
        )
    if spec.weights is not None:
        if len(spec.weights) != len(names):
            raise ConfigError(
                f"Field {spec.name!r} (mix) has {len(spec.weights)} weights for {len(names)} fields; give one "
                "weight per field of `of` (or none: equal weights)."
            )
        for w in spec.weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ConfigError(
                    f"Field {spec.name!r} (mix): weight {w!r} must be a finite number > 0. Fix it in the fields "
                    "config."
                )


def _check_guider_kwargs(spec: FieldSpec, cls: type) -> None:
    """``guider_kwargs`` against the guider's constructor, so a typo fails before the model loads."""
    import inspect

    signature = inspect.signature(cls)
    try:
        signature.bind(**spec.guider_kwargs)
    except TypeError as exc:
        accepted = [n for n, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD]
        raise ConfigError(
            f"Field {spec.name!r}: guider_kwargs {sorted(spec.guider_kwargs)} do not fit {cls.__name__} ({exc}); "
            f"it takes {accepted}."
        ) from exc
    for key, value in spec.guider_kwargs.items():  # each value of the type its parameter takes
        kind = _parameter_kind(signature.parameters.get(key))
        ok = {
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "true or false": isinstance(value, bool),
            "text": isinstance(value, str),
            "a list": isinstance(value, (list, tuple)),
        }.get(kind, True)
        if not ok:
            raise ConfigError(
                f"Field {spec.name!r}: guider_kwargs.{key} must be {'a ' if kind == 'number' else ''}{kind} for "
                f"{cls.__name__}, not {_short(value)} ({type(value).__name__}). Fix it in the fields config."
            )
    import logging

    quiet = logging.getLogger(
        "diffusers.guiders.guider_utils"
    )  # its "experimental" notice comes at build time
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:  # a guider checks its own values when built; building it loads nothing
        cls(**spec.guider_kwargs)
    except Exception as exc:
        raise ConfigError(
            f"Field {spec.name!r}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in spec.guider_kwargs.items())[:200]}) "
            f"fails: {' '.join(str(exc).split())[:200]}. Fix guider_kwargs in the fields config."
        ) from exc
    finally:
        quiet.setLevel(level)


def _parameter_kind(param: Any) -> str | None:
    """What a constructor parameter takes, from its default (else its annotation): number, true or false,
    text, a list, or None when it cannot be told."""
    import inspect

    if param is None:
        return None
    default = param.default
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "number"
    if isinstance(default, str):
        return "text"
    if isinstance(default, (list, tuple)):
        return "a list"
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("Optional[", "").replace(" | None", "").replace("]", "").strip()
    return {"float": "number", "int": "number", "bool": "true or false", "str": "text"}.get(text)


def _check_lora_on_checkpoint(spec: FieldSpec, config: FieldsConfig) -> None:
    """``{type: lora, of: CKPT}``: the LoRA applied to a full-checkpoint field (a separate frozen model)."""
    target = config.fields.get(spec.of)
    if target is None:
        raise ConfigError(
            f"Field {spec.name!r} (lora) is put on unknown field {spec.of!r}; `of` of a lora field names a "
            f"checkpoint field. Declared fields: {sorted(config.fields)}."
        )
    if target.type != "checkpoint":
        hint = (
            "drop `of`: a lora field without it is applied to the base model"
            if target.type == "base"
            else "declare the full model as a `checkpoint` field and name it"
        )
        raise ConfigError(
            f"Field {spec.name!r} (lora) is put on {spec.of!r}, a {target.type} field, but `of` of a lora field must "
            f"name a checkpoint field (the LoRA is applied to that full model); {hint}."
        )


def config_from_flags(
    cfg_scale: float | None = None,
    expert_lora: str | None = None,
    expert_checkpoint: str | None = None,
    task: str = "t2i",
) -> FieldsConfig:
    """The common one-route cases without a file: CFG absorption and/or a single expert."""
    if expert_lora and expert_checkpoint:
        raise ConfigError(
            "--expert_lora and --expert_checkpoint both given; use one, or a --fields_config with both."
        )
    fields: dict[str, FieldSpec] = {"base": FieldSpec("base", "base")}
    target = "base"
    if expert_lora:
        fields["expert"] = FieldSpec("expert", "lora", path=expert_lora)
        target = "expert"
    if expert_checkpoint:
        fields["expert"] = FieldSpec("expert", "checkpoint", path=expert_checkpoint)
        target = "expert"
    if cfg_scale is not None:
        fields[f"{target}_cfg"] = FieldSpec(f"{target}_cfg", "cfg", of=target, scale=cfg_scale)
        target = f"{target}_cfg"
    if target == "base":
        raise ConfigError(
            "Nothing to distill: the student would learn its own base. Pass --fields_config, --cfg_scale "
            "(CFG absorption) or --expert_lora / --expert_checkpoint."
        )
    config = FieldsConfig(fields=fields, routes=[RouteSpec(field=target, task=task)])
    check_fields_config(config)
    return config
