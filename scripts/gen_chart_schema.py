"""Write the `llm` part of helm/llm-cluster/values.schema.json from LLMConfig's JSON schema.

The rest of values.schema.json (the chart's own values) is edited by hand; this replaces only
`properties.llm`, so LLMConfig stays the one source of the served application's settings.
`--check` changes nothing and exits 1 when the committed schema is out of date (the whole file is
written as indented JSON, so run the script after editing the hand-written part too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving.config import LLMConfig

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "helm" / "llm-cluster" / "values.schema.json"
# Fields the chart sets from its own values (model location, Serve's HTTP port, application name, metrics port).
CHART_OWNED = {"model": ["source"], "server": ["host", "port", "app_name", "metrics_port"]}


def llm_schema() -> dict[str, Any]:
    """LLMConfig's schema with references inlined, the chart-owned fields removed, and no titles or
    whole-section defaults (the fields' own defaults say the same)."""
    schema = LLMConfig.model_json_schema()
    definitions = schema.pop("$defs", {})
    llm = _inline(schema, definitions)
    for section, fields in CHART_OWNED.items():
        for field in fields:
            del llm["properties"][section]["properties"][field]
    llm["description"] = (
        "The served application's LLMConfig (serving/config.py). model.source, server.host, server.port, "
        "server.app_name and server.metrics_port are set by the chart from model, api and monitoring."
    )
    return llm


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[-1]]
        return _inline({**target, **{k: v for k, v in node.items() if k != "$ref"}}, definitions)
    return {
        key: _inline(value, definitions)
        for key, value in node.items()
        if key != "title" and not (key == "default" and isinstance(value, dict))
    }


def render(current: dict[str, Any]) -> str:
    updated = {**current, "properties": {**current["properties"], "llm": llm_schema()}}
    return json.dumps(updated, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema differs")
    args = parser.parse_args()
    text = SCHEMA_PATH.read_text(encoding="utf-8")
    expected = render(json.loads(text))
    if args.check:
        if text != expected:
            print(f"{SCHEMA_PATH} is out of date: run python scripts/gen_chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(expected, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
