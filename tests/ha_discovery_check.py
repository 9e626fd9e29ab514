"""Home Assistant's own MQTT discovery code judging the appliance's discovery payloads. Run by
tests/test_home_assistant_schema.py with the Python of a virtual environment that has Home
Assistant installed (never the appliance's): a JSON request on stdin, a JSON answer on stdout.

Request: {"prefix": "homeassistant", "entities": [{"topic", "config", "states": [payload, ...],
"availability": [payload, ...]}, ...]}. Answer, per entity: the discovery topic's component, the
error Home Assistant's schema raised (or null), the keys it would drop (its discovery schemas
remove unknown keys silently, so a misspelt key would pass unseen), the validated config, and
what its templates make of the given state and availability payloads.
"""
import asyncio
import copy
import importlib
import json
import sys
import tempfile

# Before the MQTT component: it imports the HTTP and websocket components, which import each
# other, and only Home Assistant's start-up order imports them without a cycle.
import homeassistant.bootstrap  # noqa: F401
import voluptuous as vol
from homeassistant.components.mqtt import discovery
from homeassistant.core import HomeAssistant
from homeassistant.helpers.template import Template

NOT_RENDERED = "<no value>"


def jsonable(value):
    if isinstance(value, Template):
        return value.template
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def render(hass, template, payloads):
    if template is None:
        return list(payloads)
    text = template.template if isinstance(template, Template) else template
    return [Template(text, hass).async_render_with_possible_json_value(p, NOT_RENDERED)
            for p in payloads]


def judge(hass, prefix: str, entity: dict) -> dict:
    topic, config = entity["topic"], entity["config"]
    answer = {"topic": topic, "component": None, "error": None, "dropped": [],
              "device_dropped": [], "validated": None, "states": [], "availability": []}
    match = discovery.TOPIC_MATCHER.match(topic[len(prefix) + 1:]) \
        if topic.startswith(prefix + "/") else None
    if match is None:
        answer["error"] = f"not a discovery topic under {prefix!r}"
        return answer
    component = answer["component"] = match.group("component")
    if component not in discovery.SUPPORTED_COMPONENTS:
        answer["error"] = f"component {component!r} is not one MQTT discovery supports"
        return answer
    schema = importlib.import_module(f"homeassistant.components.mqtt.{component}").DISCOVERY_SCHEMA
    try:
        validated = schema(copy.deepcopy(config))
    except vol.Invalid as e:
        answer["error"] = str(e)
        return answer
    answer["dropped"] = sorted(set(config) - set(validated))
    answer["device_dropped"] = sorted(set(config.get("device", {})) - set(validated.get("device", {})))
    answer["validated"] = jsonable(validated)
    answer["states"] = render(hass, validated.get("value_template"), entity["states"])
    answer["availability"] = render(hass, validated.get("availability_template"),
                                    entity["availability"])
    return answer


async def main(request: dict) -> list:
    hass = HomeAssistant(tempfile.mkdtemp())     # templates render only with one
    try:
        return [judge(hass, request["prefix"], e) for e in request["entities"]]
    finally:
        await hass.async_stop(force=True)


if __name__ == "__main__":
    json.dump(asyncio.run(main(json.load(sys.stdin))), sys.stdout)
