"""The CEL validation rules (x-kubernetes-validations) of a CRD's schema, evaluated as the API server does on
create (rules that use oldSelf skipped) and on update (oldSelf: the stored object's value at the same place).
CEL by cel-python (celpy)."""

from __future__ import annotations

from functools import cache
from typing import Any

import celpy

_MISSING = object()


@cache
def _program(rule: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def violations(schema: dict[str, Any], new: Any, old: Any = _MISSING, path: str = "") -> list[str]:
    """Each rule that `new` breaks, as "path: message"."""
    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is _MISSING:
            continue
        activation = {"self": celpy.json_to_cel(new)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        result = _program(rule["rule"]).evaluate(activation)
        if isinstance(result, celpy.CELEvalError) or not bool(result):
            out.append(f"{path or '.'}: {rule.get('message') or rule['rule']}")
    if isinstance(new, dict):
        old_map = old if isinstance(old, dict) else {}
        for key, value in new.items():
            child = (schema.get("properties") or {}).get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                out += violations(child, value, old_map.get(key, _MISSING), f"{path}.{key}")
    elif isinstance(new, list) and "items" in schema:
        keys = schema.get("x-kubernetes-list-map-keys")
        olds = {tuple(item.get(k) for k in keys): item for item in old} if keys and isinstance(old, list) else {}
        for i, item in enumerate(new):
            previous = olds.get(tuple(item.get(k) for k in keys), _MISSING) if keys else _MISSING
            out += violations(schema["items"], item, previous, f"{path}[{i}]")
    return out
