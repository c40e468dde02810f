"""Options checked before any work: types and declared ranges, for the CLI, recipes and the Python API alike.

A field of ``TrainConfig`` or of a method's ``Options`` declares what it accepts in its metadata
(``field(default=32, metadata=limits(min=1))``, ``option(8, "Rank...", min=1)``):

* ``min`` / ``max``: inclusive bounds; ``above`` / ``below``: exclusive ones (a learning rate is
  ``above=0``: zero trains nothing); ``choices``: the values allowed.
* Every number must be finite (NaN and infinity are never an option's value), and a value must have
  the field's type: a whole number for ``int`` (``200.7`` is refused, ``200.0`` and ``"200"`` pass),
  a number for ``float`` (YAML reads ``1e-4`` as text: it passes), text for ``str``, true/false for ``bool``.

A wrong value is one sentence naming the flag (``--batch-size must be a whole number of at least 1; got 0.``)
or, for a recipe value, the file and key (``Recipe 'r.yaml': key 'epochs' must be a number; got 'one'.``).
Nothing here imports torch or transformers, except :func:`check_model_limits` for a Hub model id (it reads
only the model's configuration).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any, Mapping

from peftlab.errors import PeftlabError

# Option names whose values are learning rates: checked with the bounds of TrainConfig.lr (--lr).
LEARNING_RATE = "learning_rate"
_TYPE_WORDS = {bool: "true or false (bool)", int: "a whole number (int)", float: "a number (float)", str: "text (str)",
               list: "a list", dict: "a mapping"}
# Model families whose position ids start after the padding index (RoBERTa's padding_idx + 1), so a
# config with max_position_embeddings 514 holds 512 tokens.
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert", "longformer")


def limits(*, min=None, max=None, above=None, below=None, choices=None) -> dict[str, Any]:
    """The metadata of a field's accepted values (see the module docstring)."""
    found = dict(min=min, max=max, above=above, below=below, choices=choices)
    return {key: value for key, value in found.items() if value is not None}


class _Wrong(Exception):
    """A value outside what the field accepts; the message says what it accepts."""


class _NotAChoice(_Wrong):
    """A value that is not one of the field's choices."""


# ---- one value --------------------------------------------------------------------------------------------

def _base_type(hint) -> tuple[type | None, bool]:
    """(bool/int/float/str/list/dict or None for anything, optional) of a type hint."""
    optional = False
    args = typing.get_args(hint)
    if args and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else Any
    origin = typing.get_origin(hint) or hint
    return (origin if origin in _TYPE_WORDS else None), optional


def _coerce(value, base: type | None):
    """``value`` as ``base`` (YAML and CLI spellings accepted), or _Wrong."""
    if base is None:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise _Wrong(_TYPE_WORDS[bool])
    if base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _Wrong(_TYPE_WORDS[base])
        try:
            number = float(value)
        except ValueError:
            raise _Wrong(_TYPE_WORDS[base]) from None
        if base is float:
            return number
        if not math.isfinite(number) or not number.is_integer():
            raise _Wrong(_TYPE_WORDS[int])
        return int(number)
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Wrong(_TYPE_WORDS[str])
    if base is list:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise _Wrong(_TYPE_WORDS[list])
    if not isinstance(value, dict):
        raise _Wrong(_TYPE_WORDS[dict])
    return value


def _join(words) -> str:
    words = [str(w) for w in words]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _check_range(value, base: type | None, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise _NotAChoice(f"use one of {_join(choices)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    noun = "a whole number" if base is int else "a finite number"
    bounds, number = [], (lambda x: str(x) if isinstance(x, int) else f"{x:g}")
    if "min" in meta and "max" in meta:
        bounds.append(f"from {number(meta['min'])} to {number(meta['max'])}")
    elif "min" in meta:
        bounds.append(f"of at least {number(meta['min'])}" if base is int else f"at least {number(meta['min'])}")
    elif "max" in meta:
        bounds.append(f"at most {number(meta['max'])}")
    if "above" in meta:
        bounds.append(f"above {number(meta['above'])}")
    if "below" in meta:
        bounds.append(f"below {number(meta['below'])}")
    expectation = f"{noun} {' and '.join(bounds)}".strip()
    if not math.isfinite(value):
        raise _Wrong(expectation)
    if ("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"]) \
            or ("above" in meta and value <= meta["above"]) or ("below" in meta and value >= meta["below"]):
        raise _Wrong(expectation)


def checked_value(value, *, name: str, hint=None, default=None, meta: Mapping[str, Any] | None = None,
                  subject: tuple[str, str]):
    """``value`` of the field ``name`` coerced to its type and checked against its ``meta`` limits; one
    sentence otherwise.

    The type comes from ``hint`` (a type hint) or else from ``default``'s type; ``subject`` is (where,
    what): ("", "--batch-size"), ("Recipe 'r.yaml': ", "key 'epochs'"), ("", "option 'r' of method 'lora'")."""
    if hint is not None:
        base, optional = _base_type(hint)
    else:
        base, optional = (type(default) if type(default) in _TYPE_WORDS else None), default is None
    if value is None and optional:
        return None
    where, what = subject
    try:
        value = _coerce(value, base)
        _check_range(value, base, meta or {})
    except _NotAChoice as wrong:
        unknown = f"{'unknown' if where else 'Unknown'} {name.replace('_', ' ')}"
        raise PeftlabError(f"{where}{unknown} {value!r} ({what}): {wrong}.") from None
    except _Wrong as wrong:
        raise PeftlabError(f"{where}{what[:1].upper() if not where else what[:1]}{what[1:]} must be {wrong}; "
                           f"got {value!r}.") from None
    return value


def _subject(key: str, sources: Mapping[str, str] | None, owner: str | None = None) -> tuple[str, str]:
    source = (sources or {}).get(key)
    if owner is not None:
        what = f"option '{key}' of method '{owner}'"
    else:
        what = f"key '{key}'" if source else ("--lr" if key == "lr" else "--" + key.replace("_", "-"))
    return (f"Recipe '{source}': " if source else ""), what


# ---- a training configuration -----------------------------------------------------------------------------

def _train_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    from peftlab.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def check_train_values(values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``TrainConfig`` fields among flat ``values`` (CLI flags, recipe keys), typed and checked; other
    keys pass through unchanged. ``sources``: key -> the recipe file it came from (named in errors)."""
    fields = _train_fields()
    checked = dict(values)
    for key, value in values.items():
        if key in fields and key not in ("method_options", "task_options"):
            field, hint = fields[key]
            checked[key] = checked_value(value, name=key, hint=hint, meta=field.metadata,
                                         subject=_subject(key, sources))
    return checked


def check_method_values(method_class, values: Mapping[str, Any],
                        sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A method's options among ``values`` typed (by the default's type) and checked against their declared
    limits; ``learning_rate`` against --lr's. Unknown names pass through (the method names them)."""
    fields = {f.name: f for f in method_class.option_fields()}
    lr_meta = _train_fields()["lr"][0].metadata
    checked = dict(values)
    for key, value in values.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        meta = {**lr_meta, **field.metadata} if key == LEARNING_RATE else field.metadata
        checked[key] = checked_value(value, name=key, default=default, meta=meta,
                                     subject=_subject(key, sources, owner=method_class.name))
    return checked


def check_config(config):
    """A ``TrainConfig`` with every field and method option typed and within its limits (one sentence
    otherwise): what ``train()`` runs first, whoever built the config."""
    from peftlab.methods import get_method_class

    from peftlab.tracking import parse_report_to

    values = check_train_values({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    parse_report_to(values.get("report_to"))  # an unknown or uninstalled tracker before any work
    values["method_options"] = check_method_values(get_method_class(values["method"]),
                                                   dict(config.method_options or {}))
    return dataclasses.replace(config, **values)


# ---- what the model allows ---------------------------------------------------------------------------------

def position_limit(model_config: Mapping[str, Any]) -> int | None:
    """The most tokens a model's position embeddings hold (None: relative positions, no fixed maximum)."""
    if "relative_attention_num_buckets" in model_config:  # T5 family: relative position buckets
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = model_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if model_config.get("model_type") in _POSITIONS_AFTER_PADDING:
                value -= int(model_config.get("pad_token_id") or 0) + 1
            return value
    return None


def _model_config(name: str) -> dict[str, Any] | None:
    """The model's config.json as a dict: read from its folder, or (a Hub id) through transformers."""
    from peftlab.models import resolve_model

    path = Path(resolve_model(name))
    if (path / "config.json").is_file():
        try:
            return json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None  # loading the model reports what is wrong with it
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path)).to_dict()
    except Exception:  # offline or unknown: loading the model reports it, in one sentence
        return None


def check_model_limits(config, model_config: Mapping[str, Any] | None = None) -> None:
    """``--max-length`` within the positions the model has (one sentence otherwise)."""
    model_config = model_config if model_config is not None else _model_config(config.model)
    limit = position_limit(model_config or {})
    if limit is not None and config.max_length > limit:
        raise PeftlabError(f"--max-length {config.max_length} is more than model '{config.model}' can take: its "
                           f"position embeddings hold {limit} tokens. Use --max-length {limit} or less.")


# ---- what decides a run's result (compared when it is resumed) ---------------------------------------------

def training_identity(config) -> dict[str, Any]:
    """The options a resumed run must share with its start: method and its options (learning rate
    resolved), model, task and its options (file paths absolute), the data subset, batch, schedule, seed."""
    from peftlab.training import build_method, resolved_warmup_ratio

    method = build_method(config)
    task_options = {key: value for key, value in (config.task_options or {}).items() if value is not None}
    for key in path_options():
        if key in task_options:
            task_options[key] = os.path.abspath(os.path.expanduser(str(task_options[key])))
    identity = {
        "method": config.method, "model": config.model, "task": config.task, "task_options": task_options,
        "method_options": {k: v for k, v in method.options_dict().items() if k != LEARNING_RATE},
        "learning_rate": method.learning_rate,
        "batch_size": config.batch_size, "grad_accum": config.grad_accum, "epochs": config.epochs,
        "max_train_samples": config.max_train_samples, "max_length": config.max_length, "seed": config.seed,
        "warmup_ratio": resolved_warmup_ratio(config, method), "weight_decay": config.weight_decay,
    }
    return json.loads(json.dumps(identity, default=str))


def path_options() -> tuple[str, ...]:
    """Task options that name files (the user's own data): stored absolute with a run."""
    from peftlab.tasks.files import FILE_OPTIONS

    return tuple(option for option, _flag in FILE_OPTIONS.values())


def identity_changes(started: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'name old -> new' for every option that differs (options the start did not record are not compared);
    another method is named alone (its options and learning rate differ as a matter of course)."""
    if "method" in started and started.get("method") != now.get("method"):
        return [f"method {started['method']!r} -> {now.get('method')!r}"]
    changes = []
    for key in started:
        if key in now and started[key] != now[key]:
            if isinstance(started[key], dict) and isinstance(now[key], dict):
                inner = sorted(k for k in set(started[key]) | set(now[key]) if started[key].get(k) != now[key].get(k))
                changes += [f"{k} {started[key].get(k)!r} -> {now[key].get(k)!r}" for k in inner]
            else:
                changes.append(f"{key} {started[key]!r} -> {now[key]!r}")
    return changes


# ---- recipes ------------------------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe YAML: the same keys as the CLI flags (``lr``, ``epochs``, ``r``, ...)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"Recipe '{path}' does not exist.")
    try:
        payload = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise PeftlabError(f"Recipe '{path}' cannot be read ({getattr(error, 'strerror', None) or error}).") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise PeftlabError(f"Recipe '{path}'{where}: invalid YAML ({getattr(error, 'problem', error)}).") from None
    if not isinstance(payload, dict):
        raise PeftlabError(f"Recipe '{path}' must be a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in payload.items()}
