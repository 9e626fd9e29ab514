"""The policy: rules as data (`rules`), the engine that evaluates them (`engine`), the built-in
rules (`builtin`) and the device-type profiles (`profiles`). What the rest of the appliance uses
is named here."""
from appliance.policy.builtin import builtin_rules
from appliance.policy.engine import Engine
from appliance.policy.rules import Decision, Facts, Rule, Stimulus, parse_duration, parse_rule

__all__ = ["Decision", "Engine", "Facts", "Rule", "Stimulus", "builtin_rules", "parse_duration",
           "parse_rule"]
