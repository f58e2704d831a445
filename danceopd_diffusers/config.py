"""The fields-and-routes declaration (``--fields_config``) and its static checks.

Everything here runs before any model weights load, so a typo costs seconds, not a model download.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIELD_TYPES = ("base", "lora", "checkpoint", "cfg", "guider", "image_guidance", "mix")
OPERATOR_TYPES = ("cfg", "guider", "image_guidance", "mix")
EDIT_ONLY_TYPES = ("image_guidance",)


class ConfigError(ValueError):
    """A problem in the user's fields config or flags, with the fix in its message."""


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
        """The field and the fields it is built on, outermost first (depth first through a mix's fields)."""
        chain = [self.fields[name]]
        for inner in chain[0].inputs():
            chain += self.resolve_chain(inner)
        return chain

    def transformer_field(self, name: str) -> FieldSpec:
        return self.resolve_chain(name)[-1]

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


def _check_type(where: str, key: str, value: Any, types: tuple[type, ...]) -> None:
    is_bool = isinstance(value, bool)
    if not isinstance(value, types) or (is_bool and bool not in types):
        kind = "a number" if float in types else ("true or false" if bool in types else types[0].__name__)
        raise ConfigError(
            f"{where}: `{key}` must be {kind}, not {value!r} ({type(value).__name__}). Fix it in the fields config."
        )


def _check_finite(where: str, key: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        raise ConfigError(
            f"{where}: `{key}` is {value}; it must be a finite number. Fix it in the fields config."
        )


@functools.cache
def _unique_key_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
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
    if not path.is_file():
        raise ConfigError(f"--fields_config {path} does not exist. Pass the path of a .yaml or .json file.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"--fields_config {path} cannot be read ({exc}). Pass a .yaml or .json text file."
        ) from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader
        else:
            data = json.loads(text, object_pairs_hook=_unique_json_pairs)
    except ConfigError as exc:
        raise ConfigError(f"--fields_config {path}: {exc}") from exc
    except Exception as exc:  # the parser's message says where
        raise ConfigError(f"--fields_config {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--fields_config {path} must hold a mapping with the keys `fields` and `routes`.")
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
    fields: dict[str, FieldSpec] = {}
    allowed = set(FieldSpec.__dataclass_fields__) - {"name"}
    for name, raw in raw_fields.items():
        if not isinstance(raw, dict):
            raise ConfigError(f"Field {name!r} must be a mapping with at least `type`.")
        extra = set(raw) - allowed
        if extra:
            raise ConfigError(
                f"Field {name!r} has unknown key(s) {sorted(extra)}; allowed keys: {sorted(allowed)}."
            )
        for key, value in raw.items():
            if value is not None:
                _check_type(f"Field {name!r}", key, value, _KEY_TYPES[key])
        spec = FieldSpec(name=str(name), **raw)
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
    routes = []
    for raw in raw_routes:
        if not isinstance(raw, dict) or "field" not in raw:
            raise ConfigError(
                f"Route {raw!r} must be a mapping with `field` (and optionally `task`, `weight`)."
            )
        extra = set(raw) - {"field", "task", "weight"}
        if extra:
            raise ConfigError(
                f"Route {raw!r} has unknown key(s) {sorted(extra)}; allowed: field, task, weight."
            )
        _check_type(f"Route to {raw['field']!r}", "weight", raw.get("weight", 1.0), (int, float))
        routes.append(
            RouteSpec(
                field=str(raw["field"]),
                task=str(raw.get("task", "t2i")),
                weight=float(raw.get("weight", 1.0)),
            )
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
    for spec in config.fields.values():  # cycles through `of`
        _check_no_cycle(spec, config, (spec.name,))
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


def _check_no_cycle(spec: FieldSpec, config: FieldsConfig, path: tuple[str, ...]) -> None:
    for inner in spec.inputs():
        if inner in path:
            raise ConfigError(f"Fields {sorted(set(path))} are built on each other in a cycle; break it.")
        _check_no_cycle(config.fields[inner], config, path + (inner,))


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
